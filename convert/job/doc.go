// Package job runs one conversion job: it reads a source image or index from
// a registry or an OCI image layout, converts it with package convert, writes
// the result to a destination, and returns a typed Report (the JSON schema
// 'lazybase convert --json' prints).
//
// A job refuses a destination that names its source unless the request
// allows it (Request.Overwrite; ErrOverwritesSource otherwise), binds a
// prefetch source to the opened image (a profile recorded for another image
// is ignored with a warning), refuses a single image whose platform is not
// among the requested ones (unless Request.AnyImagePlatform), and writes the
// destination tag last, so a failed job leaves the destination as it was.
// Errors name the source, and the converter's errors name the image and
// layer at fault.
//
// Callers that keep converted layers across jobs (the mirror shares them
// between the images of a run and takes them from conversion records) hand
// the job their own Request.Layer; callers that can tell a destination is
// already up to date hand it Request.UpToDate. The package prints nothing:
// progress goes to the request's hooks.
package job
