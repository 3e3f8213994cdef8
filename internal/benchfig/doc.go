// Package benchfig holds the figures the e2e benchmarks write as JSON and
// renders them as the markdown tables of the README's Figures section, so
// that the README's figures come from benchmark output and are never
// typed by hand.
//
// A benchmark writes one file, NAME.json (the e2e helper writeFigures);
// `make figures` (internal/cmd/figures) renders each file it has a renderer
// for and replaces the README's text between the markers
//
//	<!-- figures:NAME:begin -->
//	<!-- figures:NAME:end -->
//
// with it (Replace). ExportBench is the schema of TestExportBench's file
// (NAME "exportbench").
package benchfig
