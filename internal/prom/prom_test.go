package prom

import (
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

func counter(name string) prometheus.Counter {
	return prometheus.NewCounter(prometheus.CounterOpts{Name: name, Help: name})
}

// Register is all or nothing: a duplicate leaves nothing of its call
// registered; a nil Registerer registers nothing and fails never.
func TestRegister(t *testing.T) {
	reg := prometheus.NewRegistry()
	if err := Register(reg, counter("a_total")); err != nil {
		t.Fatal(err)
	}
	if err := Register(reg, counter("b_total"), counter("a_total")); err == nil {
		t.Fatal("duplicate registered")
	}
	if n, err := testutil.GatherAndCount(reg); err != nil || n != 1 {
		t.Fatalf("%d series registered (%v), want only a_total", n, err)
	}
	if err := Register(reg, counter("b_total")); err != nil {
		t.Fatalf("b_total after the failed call: %v", err)
	}
	if err := Register(nil, counter("a_total"), counter("a_total")); err != nil {
		t.Fatalf("nil registerer: %v", err)
	}
}
