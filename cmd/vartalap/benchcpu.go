package main

import (
	"fmt"
	"math"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/vartalap/vartalap/schema"
)

// userHZ is the unit of the CPU times in /proc/<pid>/stat (USER_HZ, 100 on
// every Linux architecture Go supports).
const userHZ = 100

// procCPUSeconds reads the user plus system CPU time of pid from
// /proc/<pid>/stat; -1 when it cannot.
func procCPUSeconds(pid int) float64 {
	if pid <= 0 {
		return -1
	}
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return -1
	}
	return parseProcStatCPU(string(data))
}

// parseProcStatCPU returns utime+stime (fields 14 and 15) of a
// /proc/<pid>/stat line in seconds, -1 if it does not parse. The command
// name (field 2) is in parentheses and may hold spaces and parentheses, so
// the fields are counted from the last ')'.
func parseProcStatCPU(stat string) float64 {
	i := strings.LastIndexByte(stat, ')')
	if i < 0 {
		return -1
	}
	f := strings.Fields(stat[i+1:]) // f[0] is field 3 (state)
	if len(f) < 13 {
		return -1
	}
	utime, err1 := strconv.ParseUint(f[11], 10, 64)
	stime, err2 := strconv.ParseUint(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return -1
	}
	return float64(utime+stime) / userHZ
}

// serverCPU is the server's CPU time so far in seconds: from /proc with
// --server-pid, else process_cpu_seconds_total at --server-metrics; -1
// when neither is given or readable.
func (c *benchConfig) serverCPU() float64 {
	if c.ServerPID > 0 {
		return procCPUSeconds(c.ServerPID)
	}
	if c.MetricsURL != "" {
		if v, ok := metricsValue(c.MetricsURL, "process_cpu_seconds_total"); ok {
			return v
		}
	}
	return -1
}

// calibrationFrame is schema's BenchmarkDecodeJSON frame.
const calibrationFrame = `{"_v":2.1,"id":"alice17000000000001","head":{"type":"INDIVIDUAL","to":"bob","chatid":"alice","contentType":"text","action":"message","ephemeral":false},"meta":{"hash":"md5:x"},"body":{"text":"hello bob, how are you doing today?","ts":1700000000}}`

// calibrate times schema.DecodeJSON of a chat frame on this machine, the
// best of five rounds, in nanoseconds per frame: the same work as schema's
// BenchmarkDecodeJSON, so that runs on different machines, or on a shared
// one at different times, can be told apart.
func calibrate() float64 {
	data := []byte(calibrationFrame)
	best := math.Inf(1)
	for range 5 {
		const n = 2000
		start := time.Now()
		for range n {
			if _, err := schema.DecodeJSON(data); err != nil {
				panic(err) // a constant frame
			}
		}
		best = min(best, float64(time.Since(start).Nanoseconds())/n)
	}
	return best
}
