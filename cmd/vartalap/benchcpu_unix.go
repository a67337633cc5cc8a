//go:build unix

package main

import "syscall"

// selfCPUSeconds is this process's user plus system CPU time; -1 when
// unknown.
func selfCPUSeconds() float64 {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return -1
	}
	return float64(ru.Utime.Nano()+ru.Stime.Nano()) / 1e9
}
