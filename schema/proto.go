package schema

import (
	"errors"
	"fmt"
	"math"
	"sort"
	"unicode/utf8"

	"google.golang.org/protobuf/encoding/protowire"
)

// Protobuf field numbers of the seed's Message (proto/event-args.proto).
const (
	fieldVersion         protowire.Number = 1
	fieldID              protowire.Number = 2
	fieldType            protowire.Number = 3
	fieldChannel         protowire.Number = 4
	fieldEphemeral       protowire.Number = 5
	fieldSource          protowire.Number = 6
	fieldDestination     protowire.Number = 7
	fieldContent         protowire.Number = 8
	fieldTimestamp       protowire.Number = 9
	fieldMeta            protowire.Number = 10
	fieldServerID        protowire.Number = 20
	fieldServerTimestamp protowire.Number = 21

	fieldMapKey   protowire.Number = 1
	fieldMapValue protowire.Number = 2
)

// MarshalProto encodes m in the seed's protobuf wire format. Version, type,
// channel and ephemeral are always written, even when zero, because seed
// clients (protobufjs) read an absent field as undefined: a SERVER_ACK must
// carry type=0 explicitly. All other fields are omitted when empty. Meta
// entries are written in sorted key order, so the output is deterministic.
func (m *Message) MarshalProto() []byte {
	return m.AppendProto(make([]byte, 0, m.protoSizeHint()))
}

// AppendProto appends the encoding of MarshalProto to b and returns the
// extended slice.
func (m *Message) AppendProto(b []byte) []byte {
	b = protowire.AppendTag(b, fieldVersion, protowire.Fixed32Type)
	b = protowire.AppendFixed32(b, math.Float32bits(m.Version))
	if m.ID != "" {
		b = appendString(b, fieldID, m.ID)
	}
	b = protowire.AppendTag(b, fieldType, protowire.VarintType)
	b = protowire.AppendVarint(b, uint64(int64(m.Type)))
	b = protowire.AppendTag(b, fieldChannel, protowire.VarintType)
	b = protowire.AppendVarint(b, uint64(int64(m.Channel)))
	b = protowire.AppendTag(b, fieldEphemeral, protowire.VarintType)
	b = protowire.AppendVarint(b, protowire.EncodeBool(m.Ephemeral))
	if m.Source != "" {
		b = appendString(b, fieldSource, m.Source)
	}
	if m.Destination != "" {
		b = appendString(b, fieldDestination, m.Destination)
	}
	if len(m.Content) > 0 {
		b = protowire.AppendTag(b, fieldContent, protowire.BytesType)
		b = protowire.AppendBytes(b, m.Content)
	}
	if m.Timestamp != 0 {
		b = protowire.AppendTag(b, fieldTimestamp, protowire.VarintType)
		b = protowire.AppendVarint(b, m.Timestamp)
	}
	if len(m.Meta) > 0 {
		b = appendMeta(b, m.Meta)
	}
	if m.ServerID != "" {
		b = appendString(b, fieldServerID, m.ServerID)
	}
	if m.ServerTimestamp != 0 {
		b = protowire.AppendTag(b, fieldServerTimestamp, protowire.VarintType)
		b = protowire.AppendVarint(b, m.ServerTimestamp)
	}
	return b
}

func appendString(b []byte, n protowire.Number, s string) []byte {
	b = protowire.AppendTag(b, n, protowire.BytesType)
	return protowire.AppendString(b, s)
}

// appendMeta writes the map entries in sorted key order. Small maps (the
// usual case) are sorted in a stack array to avoid allocating.
func appendMeta(b []byte, meta map[string]string) []byte {
	var arr [8]string
	keys := arr[:0]
	for k := range meta {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		v := meta[k]
		size := protowire.SizeTag(fieldMapKey) + protowire.SizeBytes(len(k)) +
			protowire.SizeTag(fieldMapValue) + protowire.SizeBytes(len(v))
		b = protowire.AppendTag(b, fieldMeta, protowire.BytesType)
		b = protowire.AppendVarint(b, uint64(size))
		b = appendString(b, fieldMapKey, k)
		b = appendString(b, fieldMapValue, v)
	}
	return b
}

// protoSizeHint returns an upper bound of the encoded size.
func (m *Message) protoSizeHint() int {
	n := 5 + 11 + 11 + 2 // version, type, channel, ephemeral
	n += 12 + len(m.ID) + len(m.Source) + len(m.Destination) + len(m.ServerID) + len(m.Content) + 5*4
	n += 11 + 12 // timestamps
	for k, v := range m.Meta {
		n += len(k) + len(v) + 3*4
	}
	return n
}

// errProto is wrapped by every UnmarshalProto error.
var errProto = errors.New("malformed protobuf message")

// UnmarshalProto decodes the seed's protobuf wire format. It is strict:
// malformed tags, varints, lengths, wrong wire types for known fields and
// invalid UTF-8 in string fields are errors. Unknown fields are skipped. It
// never panics. Content aliases nothing: it is a copy of the input bytes.
func UnmarshalProto(data []byte) (*Message, error) {
	m := &Message{}
	for len(data) > 0 {
		num, typ, n := protowire.ConsumeTag(data)
		if n < 0 {
			return nil, fmt.Errorf("%w: tag: %v", errProto, protowire.ParseError(n))
		}
		data = data[n:]
		if want, known := fieldWireType(num); known && typ != want {
			return nil, fmt.Errorf("%w: field %d has wire type %d, want %d", errProto, num, typ, want)
		}
		switch num {
		case fieldVersion:
			v, n := protowire.ConsumeFixed32(data)
			if n < 0 {
				return nil, fieldErr(num, n)
			}
			m.Version = math.Float32frombits(v)
			data = data[n:]
		case fieldType, fieldChannel, fieldEphemeral, fieldTimestamp, fieldServerTimestamp:
			v, n := protowire.ConsumeVarint(data)
			if n < 0 {
				return nil, fieldErr(num, n)
			}
			data = data[n:]
			switch num {
			case fieldType:
				m.Type = Type(int32(v))
			case fieldChannel:
				m.Channel = Channel(int32(v))
			case fieldEphemeral:
				m.Ephemeral = protowire.DecodeBool(v)
			case fieldTimestamp:
				m.Timestamp = v
			case fieldServerTimestamp:
				m.ServerTimestamp = v
			}
		case fieldID, fieldSource, fieldDestination, fieldServerID:
			v, n := protowire.ConsumeBytes(data)
			if n < 0 {
				return nil, fieldErr(num, n)
			}
			data = data[n:]
			if !utf8.Valid(v) {
				return nil, fmt.Errorf("%w: field %d: invalid utf-8", errProto, num)
			}
			switch num {
			case fieldID:
				m.ID = string(v)
			case fieldSource:
				m.Source = string(v)
			case fieldDestination:
				m.Destination = string(v)
			case fieldServerID:
				m.ServerID = string(v)
			}
		case fieldContent:
			v, n := protowire.ConsumeBytes(data)
			if n < 0 {
				return nil, fieldErr(num, n)
			}
			data = data[n:]
			if len(v) > 0 {
				m.Content = append([]byte(nil), v...)
			} else {
				m.Content = nil
			}
		case fieldMeta:
			v, n := protowire.ConsumeBytes(data)
			if n < 0 {
				return nil, fieldErr(num, n)
			}
			data = data[n:]
			k, val, err := consumeMapEntry(v)
			if err != nil {
				return nil, err
			}
			if m.Meta == nil {
				m.Meta = make(map[string]string)
			}
			m.Meta[k] = val
		default:
			n := protowire.ConsumeFieldValue(num, typ, data)
			if n < 0 {
				return nil, fieldErr(num, n)
			}
			data = data[n:]
		}
	}
	return m, nil
}

func fieldErr(num protowire.Number, n int) error {
	return fmt.Errorf("%w: field %d: %v", errProto, num, protowire.ParseError(n))
}

// fieldWireType returns the wire type of a known field.
func fieldWireType(num protowire.Number) (protowire.Type, bool) {
	switch num {
	case fieldVersion:
		return protowire.Fixed32Type, true
	case fieldType, fieldChannel, fieldEphemeral, fieldTimestamp, fieldServerTimestamp:
		return protowire.VarintType, true
	case fieldID, fieldSource, fieldDestination, fieldContent, fieldMeta, fieldServerID:
		return protowire.BytesType, true
	}
	return 0, false
}

// consumeMapEntry decodes one map<string,string> entry. Missing key or value
// mean "" (proto3 map semantics); the last occurrence of each wins.
func consumeMapEntry(data []byte) (key, value string, err error) {
	for len(data) > 0 {
		num, typ, n := protowire.ConsumeTag(data)
		if n < 0 {
			return "", "", fmt.Errorf("%w: meta entry tag: %v", errProto, protowire.ParseError(n))
		}
		data = data[n:]
		if num == fieldMapKey || num == fieldMapValue {
			if typ != protowire.BytesType {
				return "", "", fmt.Errorf("%w: meta entry field %d has wire type %d", errProto, num, typ)
			}
			v, n := protowire.ConsumeBytes(data)
			if n < 0 {
				return "", "", fmt.Errorf("%w: meta entry field %d: %v", errProto, num, protowire.ParseError(n))
			}
			data = data[n:]
			if !utf8.Valid(v) {
				return "", "", fmt.Errorf("%w: meta entry field %d: invalid utf-8", errProto, num)
			}
			if num == fieldMapKey {
				key = string(v)
			} else {
				value = string(v)
			}
			continue
		}
		n = protowire.ConsumeFieldValue(num, typ, data)
		if n < 0 {
			return "", "", fmt.Errorf("%w: meta entry field %d: %v", errProto, num, protowire.ParseError(n))
		}
		data = data[n:]
	}
	return key, value, nil
}
