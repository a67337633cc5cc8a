package delivery

import (
	"sync"

	"github.com/nats-io/nats.go"

	"github.com/vartalap/vartalap/schema"
)

// A group with many members on this node keeps its latest live messages in
// memory (recent), so that members that fell behind (their live queue
// overflowed while the node was busy) catch up from there instead of each
// re-reading GROUP_LOG through Direct Get: a thousand members re-reading
// the same messages cost the node twice the live fan-out (a header block
// per message per member), so the more it fell behind the less it
// delivered. Bounded per group by recentMsgs and recentBytes; only groups
// with recentMembers sessions here keep one.
const (
	recentMembers = 16
	recentMsgs    = 1024
	recentBytes   = 256 << 10
)

// recent is a group's latest live messages, oldest first, as the
// dispatcher received them (written by the dispatcher, read by sessions).
type recent struct {
	mu    sync.RWMutex
	buf   []recentMsg // a ring: the oldest at head
	head  int
	n     int
	bytes int
}

// recentMsg is one live message with its stream sequence and the sequence
// of the subject's previous message (Nats-Last-Sequence), which shows
// whether two messages are consecutive in the subject.
type recentMsg struct {
	seq, last uint64
	m         *nats.Msg
	dec       *schema.Message
}

func (r *recent) at(i int) *recentMsg { return &r.buf[(r.head+i)%len(r.buf)] }

// add appends a live message m (decoded: dec; its sequences: s); one
// without a sequence (ephemeral) or not after the newest is ignored.
func (r *recent) add(m *nats.Msg, dec *schema.Message, s liveSeq) {
	if !s.has || s.bad || dec == nil {
		return
	}
	seq, last := s.seq, s.last
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.n > 0 && seq <= r.at(r.n-1).seq {
		return
	}
	if r.buf == nil {
		r.buf = make([]recentMsg, recentMsgs)
	}
	for r.n > 0 && (r.n == len(r.buf) || r.bytes+len(m.Data) > recentBytes) {
		old := r.at(0)
		r.bytes -= len(old.m.Data)
		*old = recentMsg{}
		r.head = (r.head + 1) % len(r.buf)
		r.n--
	}
	*r.at(r.n) = recentMsg{seq: seq, last: last, m: m, dec: dec}
	r.n++
	r.bytes += len(m.Data)
}

// after appends to dst, in order, up to max of the messages that follow
// sequence from in the subject, as long as the ring holds them without a
// hole: the first must be the subject's next message after from (its
// previous one at or before from) and each one the next after the one
// before. newest reports that the last one appended is the newest here.
func (r *recent) after(from uint64, max int, dst []recentMsg) (_ []recentMsg, newest bool) {
	r.mu.RLock()
	defer r.mu.RUnlock()
	lo, hi := 0, r.n // the first index whose seq > from
	for lo < hi {
		mid := (lo + hi) / 2
		if r.at(mid).seq <= from {
			lo = mid + 1
		} else {
			hi = mid
		}
	}
	if lo == r.n || r.at(lo).last > from {
		return dst, false
	}
	prev := from
	for i := lo; i < r.n && len(dst) < max; i++ {
		e := r.at(i)
		if e.last > prev {
			return dst, false // a hole: the subject's message e.last is not here
		}
		dst = append(dst, *e)
		prev = e.seq
		newest = i == r.n-1
	}
	return dst, newest
}

// recentPool recycles the batches sessions read from recent.
type recentPool struct{ p sync.Pool }

func (p *recentPool) get() []recentMsg {
	if b, ok := p.p.Get().(*[]recentMsg); ok {
		return (*b)[:0]
	}
	return nil
}

func (p *recentPool) put(b []recentMsg) {
	clear(b) // hold no messages while pooled
	b = b[:0]
	p.p.Put(&b)
}
