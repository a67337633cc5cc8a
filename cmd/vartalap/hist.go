package main

import (
	"math"
	"time"
)

// hist is a mergeable latency histogram with log-spaced buckets (2% wide)
// from 1µs up; percentiles are reported as the bucket's upper bound.
type hist struct {
	Counts map[int]uint64 `json:"counts"`
	N      uint64         `json:"n"`
	Max    time.Duration  `json:"max"`
}

const histBase = 1.02

func newHist() *hist { return &hist{Counts: map[int]uint64{}} }

func (h *hist) add(d time.Duration) {
	us := float64(d) / float64(time.Microsecond)
	if us < 1 {
		us = 1
	}
	h.Counts[int(math.Log(us)/math.Log(histBase))]++
	h.N++
	if d > h.Max {
		h.Max = d
	}
}

func (h *hist) merge(o *hist) {
	if o == nil {
		return
	}
	for k, v := range o.Counts {
		h.Counts[k] += v
	}
	h.N += o.N
	if o.Max > h.Max {
		h.Max = o.Max
	}
}

// histLower is the lower bound of bucket k.
func histLower(k int) time.Duration {
	return time.Duration(math.Pow(histBase, float64(k)) * float64(time.Microsecond))
}

// quantile returns the latency below which a fraction q of samples fall.
func (h *hist) quantile(q float64) time.Duration {
	if h.N == 0 {
		return 0
	}
	maxKey := 0
	for k := range h.Counts {
		maxKey = max(maxKey, k)
	}
	target := uint64(math.Ceil(q * float64(h.N)))
	var seen uint64
	for k := 0; k <= maxKey; k++ {
		seen += h.Counts[k]
		if seen >= target {
			d := time.Duration(math.Pow(histBase, float64(k+1)) * float64(time.Microsecond))
			return min(d, h.Max)
		}
	}
	return h.Max
}

// slowCount returns how many samples of h are above d (at the histogram's
// 2% resolution).
func (h *hist) slowCount(d time.Duration) uint64 {
	var n uint64
	for k, c := range h.Counts {
		if histLower(k) >= d {
			n += c
		}
	}
	return n
}
