package main

import (
	"errors"
	"strings"

	"google.golang.org/protobuf/encoding/protowire"

	"github.com/vartalap/vartalap/schema"
)

// Protobuf Message fields the load tool reads (see schema).
const (
	fieldID      = 2
	fieldType    = 3
	fieldContent = 8
	fieldMeta    = 10
)

// scanProto reads the fields the load tool needs from a protobuf frame
// without decoding the rest: a full decode (schema.UnmarshalProto, 15
// allocations) was 7% of the load tool's CPU at 100,000 frames/s, CPU
// the server shares on one machine. The id is copied; nothing else is.
func scanProto(data []byte) (frameInfo, error) {
	var f frameInfo
	typ := uint64(schema.TypeMessage)
	for len(data) > 0 {
		num, wt, n := protowire.ConsumeTag(data)
		if n < 0 {
			return frameInfo{}, protowire.ParseError(n)
		}
		data = data[n:]
		switch {
		case num == fieldType && wt == protowire.VarintType:
			v, n := protowire.ConsumeVarint(data)
			if n < 0 {
				return frameInfo{}, protowire.ParseError(n)
			}
			typ, data = v, data[n:]
		case (num == fieldID || num == fieldContent || num == fieldMeta) && wt == protowire.BytesType:
			v, n := protowire.ConsumeBytes(data)
			if n < 0 {
				return frameInfo{}, protowire.ParseError(n)
			}
			data = data[n:]
			switch num {
			case fieldID:
				f.id = string(v)
			case fieldContent:
				f.content = v
			case fieldMeta:
				k, val, err := scanMapEntry(v)
				if err != nil {
					return frameInfo{}, err
				}
				if string(k) == schema.MetaAction && string(val) == "error" {
					f.error = true
				}
			}
		default:
			n := protowire.ConsumeFieldValue(num, wt, data)
			if n < 0 {
				return frameInfo{}, protowire.ParseError(n)
			}
			data = data[n:]
		}
	}
	f.serverAck = typ == uint64(schema.TypeServerAck)
	f.t = bodyTime(f.content)
	return f, nil
}

// scanMapEntry reads a map<string,string> entry: key = 1, value = 2.
func scanMapEntry(b []byte) (key, val []byte, err error) {
	for len(b) > 0 {
		num, wt, n := protowire.ConsumeTag(b)
		if n < 0 {
			return nil, nil, protowire.ParseError(n)
		}
		b = b[n:]
		if wt != protowire.BytesType {
			n = protowire.ConsumeFieldValue(num, wt, b)
			if n < 0 {
				return nil, nil, protowire.ParseError(n)
			}
			b = b[n:]
			continue
		}
		v, n := protowire.ConsumeBytes(b)
		if n < 0 {
			return nil, nil, protowire.ParseError(n)
		}
		b = b[n:]
		switch num {
		case 1:
			key = v
		case 2:
			val = v
		}
	}
	return key, val, nil
}

// idSet records the message ids one socket received, to count duplicates.
// The load tool's own ids are "<sender>-<n>": they take a bit each in a
// bitmap per sender; any other id goes to a map. (A map of every id was
// 10% of the load tool's CPU in a 1,000-member group run.)
type idSet struct {
	bySender map[string][]uint64
	other    map[string]struct{}
}

// errNotCounter: an id without a "-<n>" suffix.
var errNotCounter = errors.New("no counter suffix")

// counterSuffix splits "<prefix>-<n>".
func counterSuffix(id string) (prefix string, n uint64, err error) {
	i := strings.LastIndexByte(id, '-')
	if i <= 0 || i == len(id)-1 || len(id)-i-1 > 9 {
		return "", 0, errNotCounter
	}
	for j := i + 1; j < len(id); j++ {
		c := id[j]
		if c < '0' || c > '9' {
			return "", 0, errNotCounter
		}
		n = n*10 + uint64(c-'0')
	}
	if n >= 1<<26 { // 8 MiB of bitmap per sender at most
		return "", 0, errNotCounter
	}
	return id[:i], n, nil
}

// add records id and reports whether it is new.
func (s *idSet) add(id string) bool {
	prefix, n, err := counterSuffix(id)
	if err != nil {
		if s.other == nil {
			s.other = map[string]struct{}{}
		}
		if _, ok := s.other[id]; ok {
			return false
		}
		s.other[id] = struct{}{}
		return true
	}
	if s.bySender == nil {
		s.bySender = map[string][]uint64{}
	}
	bits := s.bySender[prefix]
	w, b := n/64, uint64(1)<<(n%64)
	if w >= uint64(len(bits)) {
		bits = append(bits, make([]uint64, int(w)+1-len(bits)+len(bits)/2)...)
		s.bySender[prefix] = bits
	}
	if bits[w]&b != 0 {
		return false
	}
	bits[w] |= b
	return true
}
