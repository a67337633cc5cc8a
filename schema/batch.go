package schema

import (
	"errors"
	"fmt"

	"google.golang.org/protobuf/encoding/protowire"
)

// A gateway group-commits the messages its clients send: everything queued
// while its previous CHAT_IN write was in flight is stored as one CHAT_IN
// message, a batch, so a busy gateway pays one JetStream write and one fsync
// for hundreds of client messages. Its wire format is protobuf:
//
//	message Batch { repeated Entry entries = 1; }
//	message Entry {
//	  bytes  message = 1; // the accepted Message (MarshalProto), stamped
//	  string device  = 2; // the sending device
//	}
//
// A batch carries the header HeaderBatch and is published on
// ChatInBatch(node); a single message keeps its own subject ChatIn(user).
const (
	fieldBatchEntry   protowire.Number = 1
	fieldEntryMessage protowire.Number = 1
	fieldEntryDevice  protowire.Number = 2
)

// BatchEntry is one message of a CHAT_IN batch.
type BatchEntry struct {
	Message []byte   // protobuf Message; aliases the batch's bytes
	Device  DeviceID // sending device
}

// AppendBatchEntry appends one entry (msg from device) to the batch b.
func AppendBatchEntry(b, msg []byte, device DeviceID) []byte {
	n := protowire.SizeTag(fieldEntryMessage) + protowire.SizeBytes(len(msg)) +
		protowire.SizeTag(fieldEntryDevice) + protowire.SizeBytes(len(device))
	b = protowire.AppendTag(b, fieldBatchEntry, protowire.BytesType)
	b = protowire.AppendVarint(b, uint64(n))
	b = protowire.AppendTag(b, fieldEntryMessage, protowire.BytesType)
	b = protowire.AppendBytes(b, msg)
	b = protowire.AppendTag(b, fieldEntryDevice, protowire.BytesType)
	return protowire.AppendString(b, string(device))
}

// BatchEntrySize is the number of bytes AppendBatchEntry adds for msg and
// device.
func BatchEntrySize(msgLen int, device DeviceID) int {
	n := protowire.SizeTag(fieldEntryMessage) + protowire.SizeBytes(msgLen) +
		protowire.SizeTag(fieldEntryDevice) + protowire.SizeBytes(len(device))
	return protowire.SizeTag(fieldBatchEntry) + protowire.SizeBytes(n)
}

// ErrBadBatch is returned (wrapped) by ParseBatch for malformed input.
var ErrBadBatch = errors.New("malformed chat_in batch")

// ParseBatch decodes a batch. The entries' Message slices alias b. Unknown
// fields are skipped, so later versions may add some; an entry without a
// message is an error.
func ParseBatch(b []byte) ([]BatchEntry, error) {
	var out []BatchEntry
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return nil, fmt.Errorf("%w: %v", ErrBadBatch, protowire.ParseError(n))
		}
		b = b[n:]
		if num != fieldBatchEntry || typ != protowire.BytesType {
			n = protowire.ConsumeFieldValue(num, typ, b)
			if n < 0 {
				return nil, fmt.Errorf("%w: field %d: %v", ErrBadBatch, num, protowire.ParseError(n))
			}
			b = b[n:]
			continue
		}
		v, n := protowire.ConsumeBytes(b)
		if n < 0 {
			return nil, fmt.Errorf("%w: entry: %v", ErrBadBatch, protowire.ParseError(n))
		}
		b = b[n:]
		e, err := parseEntry(v)
		if err != nil {
			return nil, fmt.Errorf("%w: entry %d: %v", ErrBadBatch, len(out), err)
		}
		out = append(out, e)
	}
	return out, nil
}

func parseEntry(b []byte) (BatchEntry, error) {
	var e BatchEntry
	seen := false
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return e, protowire.ParseError(n)
		}
		b = b[n:]
		switch {
		case num == fieldEntryMessage && typ == protowire.BytesType:
			v, n := protowire.ConsumeBytes(b)
			if n < 0 {
				return e, protowire.ParseError(n)
			}
			e.Message, seen = v, true
			b = b[n:]
		case num == fieldEntryDevice && typ == protowire.BytesType:
			v, n := protowire.ConsumeBytes(b)
			if n < 0 {
				return e, protowire.ParseError(n)
			}
			e.Device = DeviceID(v)
			b = b[n:]
		default:
			n = protowire.ConsumeFieldValue(num, typ, b)
			if n < 0 {
				return e, protowire.ParseError(n)
			}
			b = b[n:]
		}
	}
	if !seen {
		return e, errors.New("no message")
	}
	return e, nil
}
