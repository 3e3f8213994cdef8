// Package eventually waits for a condition that becomes true
// asynchronously: a daemon that starts listening, a layer the export guard
// materializes, a metric that reaches a value. It replaces hand-written
// deadline loops in tests and in the e2e harness with one helper that
// polls with a growing interval and, on timeout, reports the last reason
// the condition gave.
//
// A condition is a func() error: nil means it holds, an error says why it
// does not yet. Wait returns that reason wrapped; Require fails the test
// with it.
package eventually
