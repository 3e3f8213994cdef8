// Package progress shows the progress of a conversion on a terminal or in a
// log.
//
// A Display receives convert.Event values from converter goroutines without
// blocking them, and renders them from one goroutine of its own: on a
// terminal, a live block of lines (one per layer being converted) redrawn in
// place with ANSI escapes at most ten times a second, with a permanent line
// for every finished layer scrolling above it; elsewhere, one plain line per
// finished layer.
package progress
