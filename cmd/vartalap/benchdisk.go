package main

import (
	"fmt"
	"os"
	"sync"
	"time"
)

// The disk probe. Under sync: always every stored message waits for an
// fsync, so a disk that stalls now and then shows in every latency the
// load tool measures: on this project's 2-core VMs a lone 4-KiB
// write+fsync takes 0.2 ms at the median and, several times in 15 s on an
// otherwise idle machine, 30–250 ms. A run's tail latency says little
// without knowing whether such stalls happened during it, so the load tool
// measures the disk beside the run: a 4-KiB write and fsync every
// diskProbeEvery in a file of its own (in --disk-probe, which should be on
// the server's data disk), and reports their times.

const (
	diskProbeEvery = 10 * time.Millisecond
	// slowFsync is the fsync time above which the report counts a stall.
	slowFsync = 20 * time.Millisecond
)

// diskProbe measures fsyncs in a directory until finish is called.
type diskProbe struct {
	fsyncs *hist
	err    error
	stop   chan struct{}
	once   sync.Once
	done   chan struct{} // closed when the probe has ended (its file removed)
}

// startDiskProbe starts a probe writing in dir.
func startDiskProbe(dir string) *diskProbe {
	p := &diskProbe{fsyncs: newHist(), stop: make(chan struct{}), done: make(chan struct{})}
	f, err := os.CreateTemp(dir, "vartalap-bench-disk-*")
	if err != nil {
		p.err = fmt.Errorf("--disk-probe: %w", err)
		close(p.done)
		return p
	}
	go func() {
		defer close(p.done)
		defer os.Remove(f.Name())
		defer f.Close()
		block := make([]byte, 4096)
		t := time.NewTicker(diskProbeEvery)
		defer t.Stop()
		for i := 0; ; i++ {
			select {
			case <-p.stop:
				return
			case <-t.C:
			}
			block[0] = byte(i)
			start := time.Now()
			if _, err := f.WriteAt(block, 0); err != nil {
				p.err = fmt.Errorf("--disk-probe: %w", err)
				return
			}
			if err := f.Sync(); err != nil {
				p.err = fmt.Errorf("--disk-probe: %w", err)
				return
			}
			p.fsyncs.add(time.Since(start))
		}
	}()
	return p
}

// finish stops the probe and returns its fsync times, or its error (which
// the caller reports as a warning: the run itself stands). It may be
// called more than once.
func (p *diskProbe) finish() (*hist, error) {
	p.once.Do(func() { close(p.stop) })
	<-p.done
	if p.err != nil {
		return nil, p.err
	}
	return p.fsyncs, nil
}
