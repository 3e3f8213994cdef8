package testimage

// TB is the part of testing.TB this package's helpers use; *testing.T,
// *testing.B and *testing.F satisfy it. It is declared here so that a
// program building images with this package (the demo) does not link the
// testing package.
type TB interface {
	Helper()
	Fatal(args ...any)
	Fatalf(format string, args ...any)
	Cleanup(func())
}
