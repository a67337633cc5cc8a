//go:build !unix

package main

// selfCPUSeconds is unknown (-1) off Unix.
func selfCPUSeconds() float64 { return -1 }
