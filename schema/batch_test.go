package schema

import (
	"bytes"
	"errors"
	"testing"
)

func TestBatchRoundTrip(t *testing.T) {
	msgs := []*Message{fullMessage(), {ID: "m2", Source: "bob", Destination: "alice"}, {}}
	devices := []DeviceID{"phone", "", "web"}
	var b []byte
	size := 0
	for i, m := range msgs {
		p := m.MarshalProto()
		size += BatchEntrySize(len(p), devices[i])
		b = AppendBatchEntry(b, p, devices[i])
	}
	if size != len(b) {
		t.Fatalf("BatchEntrySize sums to %d, batch is %d bytes", size, len(b))
	}
	got, err := ParseBatch(b)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != len(msgs) {
		t.Fatalf("%d entries, want %d", len(got), len(msgs))
	}
	for i, e := range got {
		if !bytes.Equal(e.Message, msgs[i].MarshalProto()) || e.Device != devices[i] {
			t.Errorf("entry %d: device %q, message %x", i, e.Device, e.Message)
		}
		if _, err := UnmarshalProto(e.Message); err != nil {
			t.Errorf("entry %d: %v", i, err)
		}
	}
	if got, err := ParseBatch(nil); err != nil || len(got) != 0 {
		t.Errorf("empty batch: %v, %v", got, err)
	}
}

func TestParseBatchRejectsMalformed(t *testing.T) {
	good := AppendBatchEntry(nil, []byte{0x0d, 0, 0, 0, 0}, "d")
	for name, b := range map[string][]byte{
		"truncated":        good[:len(good)-1],
		"bad tag":          {0x00},
		"entry no message": {0x0a, 0x03, 0x12, 0x01, 'd'},
		"bad length":       {0x0a, 0x7f},
	} {
		if _, err := ParseBatch(b); !errors.Is(err, ErrBadBatch) {
			t.Errorf("%s: err %v, want ErrBadBatch", name, err)
		}
	}
	// Unknown fields are skipped at both levels.
	b := append([]byte{0x10, 0x05}, good...)               // field 2 varint before the entry
	b = append(b, 0x0a, 0x05, 0x0a, 0x01, 'x', 0x18, 0x01) // entry with unknown field 3
	if got, err := ParseBatch(b); err != nil || len(got) != 2 || string(got[1].Message) != "x" {
		t.Errorf("unknown fields: %v, %v", got, err)
	}
}

func FuzzParseBatch(f *testing.F) {
	f.Add(AppendBatchEntry(AppendBatchEntry(nil, fullMessage().MarshalProto(), "phone"), []byte("x"), "web"))
	f.Add([]byte{0x0a, 0x03, 0x12, 0x01, 'd'})
	f.Fuzz(func(t *testing.T, data []byte) {
		entries, err := ParseBatch(data)
		if err != nil {
			if entries != nil {
				t.Fatal("entries returned with an error")
			}
			return
		}
		// Re-encoding what was parsed parses to the same entries.
		var b []byte
		for _, e := range entries {
			b = AppendBatchEntry(b, e.Message, e.Device)
		}
		again, err := ParseBatch(b)
		if err != nil || len(again) != len(entries) {
			t.Fatalf("re-encoded batch: %v (%d vs %d entries)", err, len(again), len(entries))
		}
		for i := range again {
			if !bytes.Equal(again[i].Message, entries[i].Message) || again[i].Device != entries[i].Device {
				t.Fatalf("entry %d changed", i)
			}
		}
	})
}
