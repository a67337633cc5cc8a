package router

import (
	"context"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/vartalap/vartalap/schema"
)

// prefill publishes msgs to CHAT_IN asynchronously and waits for every
// PubAck.
func (e *env) prefill(b *testing.B, msgs []*schema.Message) {
	b.Helper()
	futs := make([]jetstream.PubAckFuture, 0, len(msgs))
	for _, m := range msgs {
		pm := &nats.Msg{Subject: schema.ChatIn(schema.UserID(m.Source)), Data: m.MarshalProto(), Header: nats.Header{}}
		pm.Header.Set(schema.HeaderMsgID, m.Source+":"+m.ID)
		f, err := e.js.PublishMsgAsync(pm)
		if err != nil {
			b.Fatalf("prefill: %v", err)
		}
		futs = append(futs, f)
		if len(futs)%2000 == 0 { // stay under the async publisher's pending limit
			select {
			case <-e.js.PublishAsyncComplete():
			case <-time.After(time.Minute):
				b.Fatal("prefill: no pubacks")
			}
		}
	}
	for _, f := range futs {
		select {
		case <-f.Ok():
		case err := <-f.Err():
			b.Fatalf("prefill: %v", err)
		case <-time.After(time.Minute):
			b.Fatal("prefill: no puback")
		}
	}
}

// routeAll runs the router until stream holds want messages and returns
// the rate at which they were stored (messages per second).
func (e *env) routeAll(b *testing.B, stream string, want uint64) float64 {
	b.Helper()
	ctx := context.Background()
	st, err := e.js.Stream(ctx, stream)
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	b.ResetTimer()
	stop := e.start(b)
	deadline := time.Now().Add(10 * time.Minute)
	for {
		info, err := st.Info(ctx)
		if err != nil {
			b.Fatal(err)
		}
		if info.State.Msgs >= want {
			break
		}
		if time.Now().After(deadline) {
			b.Fatalf("%s holds %d of %d messages", stream, info.State.Msgs, want)
		}
		time.Sleep(2 * time.Millisecond)
	}
	b.StopTimer()
	rate := float64(want) / b.Elapsed().Seconds()
	stop()
	return rate
}

// BenchmarkRoute1to1 routes b.N 1:1 messages (100 senders to 100
// recipients) from CHAT_IN into INBOX on a sync: always server.
func BenchmarkRoute1to1(b *testing.B) {
	e := newEnv(b, 1_000_000, Config{})
	msgs := make([]*schema.Message, b.N)
	for i := range msgs {
		msgs[i] = msg(fmt.Sprintf("s%d", i%100), fmt.Sprintf("r%d", i%100), fmt.Sprintf("b%d", i), schema.ChannelIndividual)
	}
	e.prefill(b, msgs)
	b.ReportMetric(e.routeAll(b, schema.StreamInbox, uint64(b.N)), "copies/s")
}

// groupMsgs returns the size members of group "g" and n messages to it
// from its members in turn.
func groupMsgs(size, n int) ([]schema.UserID, []*schema.Message) {
	members := make([]schema.UserID, size)
	for i := range members {
		members[i] = schema.UserID(fmt.Sprintf("u%d", i))
	}
	msgs := make([]*schema.Message, n)
	for i := range msgs {
		msgs[i] = msg(string(members[i%size]), "g", fmt.Sprintf("f%d", i), schema.ChannelGroup)
	}
	return members, msgs
}

// reportFanout reports the rate of group messages stored on GROUP_LOG
// (msgs/s) and the deliveries they stand for (deliveries/s: each goes to
// the size-1 members other than its sender).
func reportFanout(b *testing.B, rate float64, size int) {
	b.ReportMetric(rate, "msgs/s")
	b.ReportMetric(rate*float64(size-1), "deliveries/s")
}

// BenchmarkFanout routes b.N group messages to groups of 10, 100 and 1,000
// members: each is stored once on GROUP_LOG (ADR 4), so msgs/s should not
// depend on the group's size; deliveries/s is msgs/s × (members-1).
func BenchmarkFanout(b *testing.B) {
	for _, size := range []int{10, 100, 1000} {
		b.Run(fmt.Sprintf("members=%d", size), func(b *testing.B) {
			members, msgs := groupMsgs(size, b.N)
			l := &lister{groups: map[schema.GroupID][]schema.UserID{"g": members}}
			e := newEnv(b, 1_000_000, Config{Groups: l})
			e.prefill(b, msgs)
			reportFanout(b, e.routeAll(b, schema.StreamGroupLog, uint64(b.N)), size)
		})
	}
}

// BenchmarkFanoutLive is BenchmarkFanout with 1,000 members and a
// subscriber on the group's live subject (the GROUP_LOG republish,
// deliver.group.g), as a delivery process serving connected members has.
func BenchmarkFanoutLive(b *testing.B) {
	const size = 1000
	members, msgs := groupMsgs(size, b.N)
	l := &lister{groups: map[schema.GroupID][]schema.UserID{"g": members}}
	e := newEnv(b, 1_000_000, Config{Groups: l})
	nc, err := nats.Connect(e.srv.ClientURL())
	if err != nil {
		b.Fatal(err)
	}
	defer nc.Close()
	ch := make(chan *nats.Msg, 8192)
	var got atomic.Int64
	go func() {
		for range ch {
			got.Add(1)
		}
	}()
	if _, err := nc.ChanSubscribe(schema.DeliverGroup("g"), ch); err != nil {
		b.Fatal(err)
	}
	if err := nc.Flush(); err != nil {
		b.Fatal(err)
	}
	e.prefill(b, msgs)
	reportFanout(b, e.routeAll(b, schema.StreamGroupLog, uint64(b.N)), size)
	b.Logf("live messages received: %d", got.Load())
}
