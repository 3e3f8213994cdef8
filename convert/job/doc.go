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
// With its own converter and a registry destination, a job streams each
// layer it rebuilds to the destination repository while the converter
// writes it (convert.WithBlobTee, imageio.BlobUpload), so the push overlaps
// the conversion instead of following it. A streamed blob appears in the
// registry only when the job commits it, after every layer converted and
// passed its checks, with the digest the converter computed over the very
// bytes it sent (the registry checks the bytes against it); a failed job
// drops the uploads, and a layer whose upload broke off is pushed from the
// converter's file as before (Report.Totals.Streamed counts the others).
// The output is byte for byte the same either way.
//
// Callers that keep converted layers across jobs (the mirror shares them
// between the images of a run and takes them from conversion records) hand
// the job their own Request.Layer; callers that can tell a destination is
// already up to date hand it Request.UpToDate. The package prints nothing:
// progress goes to the request's hooks.
package job
