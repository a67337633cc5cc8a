// Package archtest holds tests of the repository's structure: which package
// may import which.
package archtest
