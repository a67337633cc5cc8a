package gateway

import (
	"context"
	"math"
	"sync"
	"time"

	"golang.org/x/time/rate"
)

// The fan-out gate's control constants (see fanoutGate).
const (
	gateTick  = 100 * time.Millisecond // the limit is adjusted at most this often
	gateCut   = 500 * time.Millisecond // and lowered at most this often
	gateCalm  = 3 * time.Second        // without overload before the limit is lifted
	gateFloor = 5.0                    // group messages/s the gate always lets through
)

// fanoutGate admits group messages at the rate this node's delivery keeps
// up with. While the Deliverer keeps up (the normal case) the gate is open
// and costs a lock per group message. When it reports overload
// (Overloader), the gate starts limiting at a quarter of the rate it
// admitted lately and halves the limit every gateCut while the overload lasts
// (the backlog takes a while to drain, so the signal lags the cause); once
// the overload has cleared the limit grows by 5% every gateTick, and after
// gateCalm without overload the gate opens again. This is TCP's congestion
// control with the delivery's lag for a lost packet: senders share what the
// node can deliver instead of building a backlog that only grows.
//
// A message waits for its turn (its sender's socket is not read
// meanwhile) up to the gate's maxWait; a message that would wait longer is
// refused with rate_limited, for the client to resend.
type fanoutGate struct {
	overloaded func() bool
	maxWait    time.Duration
	metrics    *metrics

	mu       sync.Mutex
	lim      *rate.Limiter // rate.Inf while open
	checked  time.Time     // last control step
	cut      time.Time     // last decrease
	hot      time.Time     // last time the Deliverer reported overload
	admitted int           // group messages admitted since checked
	rate     float64       // admitted per second, smoothed over the last steps
}

func newFanoutGate(overloaded func() bool, maxWait time.Duration, m *metrics) *fanoutGate {
	return &fanoutGate{overloaded: overloaded, maxWait: maxWait, metrics: m, lim: rate.NewLimiter(rate.Inf, 1)}
}

// admit waits for the group message's turn and reports whether it may be
// committed: false if its turn is more than maxWait away or ctx ended.
func (f *fanoutGate) admit(ctx context.Context) bool {
	now := time.Now()
	f.mu.Lock()
	if el := now.Sub(f.checked); el >= gateTick {
		f.control(now, el)
	}
	r := f.lim.ReserveN(now, 1)
	d := r.DelayFrom(now)
	if !r.OK() || d > f.maxWait {
		r.CancelAt(now)
		f.mu.Unlock()
		return false
	}
	f.admitted++
	f.mu.Unlock()
	if d <= 0 {
		return true
	}
	f.metrics.fanout.Add(d.Seconds())
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

// control adjusts the limit; el is the time since the last step. Called
// with mu held.
func (f *fanoutGate) control(now time.Time, el time.Duration) {
	cur := float64(f.admitted) / el.Seconds()
	if f.checked.IsZero() || el > 10*gateTick {
		f.rate = cur // no recent history
	} else {
		f.rate += (cur - f.rate) / 4
	}
	f.admitted, f.checked = 0, now
	open := f.lim.Limit() == rate.Inf
	lim := float64(f.lim.Limit())
	switch {
	case f.overloaded():
		f.hot = now
		if now.Sub(f.cut) < gateCut {
			return
		}
		f.cut = now
		if open {
			// What was admitted lately built the backlog the
			// signal reports: start well under it.
			lim = f.rate / 2
		}
		f.set(now, max(lim/2, gateFloor))
	case open:
	case now.Sub(f.hot) >= gateCalm:
		f.set(now, 0)
	default:
		f.set(now, lim*math.Pow(1.05, float64(el)/float64(gateTick))+1)
	}
}

// set sets the limit, 0 for none (open).
func (f *fanoutGate) set(now time.Time, lim float64) {
	if lim == 0 {
		f.lim.SetLimitAt(now, rate.Inf)
		f.metrics.fanoutLimit.Set(0)
		return
	}
	f.lim.SetLimitAt(now, rate.Limit(lim))
	f.lim.SetBurstAt(now, max(1, int(lim/10)))
	f.metrics.fanoutLimit.Set(lim)
}
