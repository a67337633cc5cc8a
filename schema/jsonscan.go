package schema

import (
	"bytes"
	"encoding/json"
)

// member is one member of a JSON object: its key (unescaped) and its value
// (the raw JSON text, aliasing the input).
type member struct {
	key []byte // aliases the input unless the key had escapes
	raw json.RawMessage
}

// members is an object's members in input order. Lookups take the last
// member of a key, as encoding/json does when it decodes into a map.
type members []member

// get returns the value of the last member named key; nil when absent.
func (ms members) get(key string) json.RawMessage {
	for i := len(ms) - 1; i >= 0; i-- {
		if string(ms[i].key) == key {
			return ms[i].raw
		}
	}
	return nil
}

// has reports whether a member named key exists.
func (ms members) has(key string) bool {
	for i := len(ms) - 1; i >= 0; i-- {
		if string(ms[i].key) == key {
			return true
		}
	}
	return false
}

// shadowed reports whether ms[i] is overridden by a later member of the
// same key.
func (ms members) shadowed(i int) bool {
	for j := i + 1; j < len(ms); j++ {
		if string(ms[j].key) == string(ms[i].key) {
			return true
		}
	}
	return false
}

// objectMembers splits data, which must be valid JSON (json.Valid), into
// the members of the object it holds. ok is false when data is not an
// object. It replaces json.Unmarshal into map[string]json.RawMessage: one
// pass, and no allocation beyond the slice and escaped keys.
func objectMembers(data []byte, buf members) (ms members, ok bool) {
	i := skipSpace(data, 0)
	if i >= len(data) || data[i] != '{' {
		return nil, false
	}
	ms = buf[:0]
	i = skipSpace(data, i+1)
	if i < len(data) && data[i] == '}' {
		return ms, true
	}
	for i < len(data) {
		// key
		end := skipJSONString(data, i)
		if end-i < 2 || data[i] != '"' {
			return nil, false
		}
		key := data[i+1 : end-1]
		if bytes.IndexByte(key, '\\') >= 0 {
			s, ok := unquote(data[i:end])
			if !ok {
				return nil, false
			}
			key = []byte(s)
		}
		i = skipSpace(data, end)
		i = skipSpace(data, i+1) // the colon
		vEnd := skipJSONValue(data, i)
		ms = append(ms, member{key: key, raw: data[i:vEnd]})
		i = skipSpace(data, vEnd)
		if i >= len(data) || data[i] == '}' {
			return ms, true
		}
		i = skipSpace(data, i+1) // the comma
	}
	return nil, false
}

func skipSpace(data []byte, i int) int {
	for i < len(data) {
		switch data[i] {
		case ' ', '\t', '\n', '\r':
			i++
		default:
			return i
		}
	}
	return i
}
