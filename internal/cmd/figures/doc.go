// Command figures regenerates the README's benchmark figures from the JSON
// the e2e benchmarks write (`make figures`): for every NAME.json in the
// input directory that internal/benchfig has a renderer for, it replaces
// the README's text between <!-- figures:NAME:begin --> and
// <!-- figures:NAME:end --> with the rendered markdown.
//
//	go run ./internal/cmd/figures -in $LAZYBASE_CACHE/bench -readme README.md
//
// A renderer whose JSON file is missing leaves its section as it is; a
// JSON file without markers in the README, or a file that cannot be
// rendered, is an error and the README is left unchanged. -check reports
// whether the README is up to date with the JSON instead of writing it.
package main
