// Package dockerfile works out which external images a Dockerfile's
// exported stage is built on, with BuildKit's own Dockerfile parser: it
// follows FROM through stage names to the image the target stage is based
// on, expands the ARGs declared before the first FROM (build arguments
// override their defaults, BuildKit's platform arguments are predefined),
// and reports scratch as no image. lazybase guard uses it to wait for
// exactly the base layers an export will read.
package dockerfile
