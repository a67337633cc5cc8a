package schema

import "testing"

const benchJSON = `{"_v":2.1,"id":"alice17000000000001","head":{"type":"INDIVIDUAL","to":"bob","chatid":"alice","contentType":"text","action":"message","ephemeral":false},"meta":{"hash":"md5:x"},"body":{"text":"hello bob, how are you doing today?","ts":1700000000}}`

func BenchmarkDecodeJSON(b *testing.B) {
	data := []byte(benchJSON)
	b.ReportAllocs()
	b.SetBytes(int64(len(data)))
	for b.Loop() {
		if _, err := DecodeJSON(data); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkRenderJSON(b *testing.B) {
	m, err := DecodeJSON([]byte(benchJSON))
	if err != nil {
		b.Fatal(err)
	}
	m.Stamp("alice", "3xJ9kq", 1700000000000)
	buf := make([]byte, 0, 1024)
	b.Run("Append", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			buf = AppendJSON(buf[:0], m)
		}
	})
	b.Run("Render", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			_ = RenderJSON(m)
		}
	})
}

func BenchmarkMarshalProto(b *testing.B) {
	m := fullMessage()
	buf := make([]byte, 0, 1024)
	b.Run("Append", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			buf = m.AppendProto(buf[:0])
		}
	})
	b.Run("Marshal", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			_ = m.MarshalProto()
		}
	})
}

func BenchmarkUnmarshalProto(b *testing.B) {
	data := fullMessage().MarshalProto()
	b.ReportAllocs()
	b.SetBytes(int64(len(data)))
	for b.Loop() {
		if _, err := UnmarshalProto(data); err != nil {
			b.Fatal(err)
		}
	}
}
