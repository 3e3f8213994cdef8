package lazypull

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"github.com/containerd/log"
	"github.com/lazybase/lazybase/prefetch"
	"github.com/sirupsen/logrus"
)

// AccessRecord is one line of an access record file: the first access to a
// file of a lazily mounted layer. The format belongs to the prefetch
// package, which turns these files into profiles.
type AccessRecord = prefetch.AccessRecord

// accessRecorder receives the first access to each file of a lazily
// mounted layer, in access order, and may be called concurrently. Records
// come from stargzAccessLog; an upstream per-access hook would call it
// directly.
type accessRecorder interface {
	recordAccess(ctx context.Context, rec AccessRecord) error
}

// accessRecording is the daemon's access recording: stargz's first-access
// entries, captured by a stargzAccessLog, written to record files and
// handed to the profile publisher.
type accessRecording struct {
	files   *accessFiles // nil without access_record_dir
	capture *stargzAccessLog
}

// startAccessRecording records the first accesses to the files of the
// layers fs mounts, from now on, in dir (when set) and in the other
// recorders.
func startAccessRecording(dir string, fs *trackingFS, others ...accessRecorder) (*accessRecording, error) {
	var to recorders
	r := &accessRecording{}
	if dir != "" {
		files, err := newAccessFiles(dir)
		if err != nil {
			return nil, err
		}
		r.files = files
		to = append(to, files)
	}
	to = append(to, others...)
	r.capture = captureStargzAccess(to, fs.imageOf)
	return r, nil
}

// stop stops recording and closes the record files.
func (r *accessRecording) stop() error {
	r.capture.stop()
	if r.files == nil {
		return nil
	}
	return r.files.close()
}

// recorders hands each record to every one of its recorders.
type recorders []accessRecorder

func (rs recorders) recordAccess(ctx context.Context, rec AccessRecord) error {
	var errs []error
	for _, r := range rs {
		if err := r.recordAccess(ctx, rec); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// accessFiles is the accessRecorder that writes dir/<image>.jsonl, one
// AccessRecord per line, per image, in the order of the records.
type accessFiles struct {
	dir string

	mu     sync.Mutex
	files  map[string]*os.File
	closed bool
}

var _ accessRecorder = (*accessFiles)(nil)

func newAccessFiles(dir string) (*accessFiles, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("access record directory %s: %w", dir, err)
	}
	return &accessFiles{dir: dir, files: map[string]*os.File{}}, nil
}

func (a *accessFiles) recordAccess(_ context.Context, rec AccessRecord) error {
	b, err := json.Marshal(rec)
	if err != nil {
		return fmt.Errorf("access record for %s of %s: %w", rec.Path, rec.Image, err)
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.closed {
		return errors.New("access records closed")
	}
	f, ok := a.files[rec.Image]
	if !ok {
		name := filepath.Join(a.dir, AccessRecordFile(rec.Image))
		if f, err = os.OpenFile(name, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600); err != nil {
			return fmt.Errorf("access record for %s: %w", rec.Image, err)
		}
		a.files[rec.Image] = f
	}
	if _, err := f.Write(append(b, '\n')); err != nil {
		return fmt.Errorf("access record file %s: %w", f.Name(), err)
	}
	return nil
}

// close closes the record files; later records fail.
func (a *accessFiles) close() error {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.closed = true
	var errs []error
	for _, f := range a.files {
		if err := f.Close(); err != nil {
			errs = append(errs, fmt.Errorf("access record file %s: %w", f.Name(), err))
		}
	}
	a.files = map[string]*os.File{}
	return errors.Join(errs...)
}

// AccessRecordFile is the name of the access record file of image in the
// access record directory (prefetch.RecordFileName).
func AccessRecordFile(image string) string { return prefetch.RecordFileName(image) }

// stargzAccessPrefix starts the message of stargz's first-access entry.
const stargzAccessPrefix = "file accessed: "

// stargzAccessLog is the adapter between stargz's file access logging and
// an accessRecorder, and the one place that depends on how stargz logs.
//
// With its log_file_access option on, stargz v0.19.1 (fs/layer/node.go,
// node.logAccessOnce, called by node.Open) logs the first open of each
// file of a mounted layer as
//
//	log.G(ctx).WithFields(log.Fields{"layer": digest string, "size": int64,
//		"mode": "0644"}).Debugf("file accessed: %s", "/abs/path")
//
// where ctx is go-fuse's per-request *fuse.Context, which carries no
// values: log.G falls back to containerd/log's default entry log.L, so a
// logger put into the context given to Mount never sees these entries,
// and mounts restored by the snapshotter at start are logged the same way
// as new ones. A debug entry is only built when log.L's logger is at debug
// level.
//
// So while it records, stargzAccessLog replaces log.L with an entry on a
// logger of its own, at debug level (or the process logger's level if more
// verbose), whose only hook turns first-access entries into records and
// forwards every entry (first-access ones included) to the process logger,
// which logs it if its own level allows: what the process logs does not
// change, and the process logger's level, formatter, output and hooks are
// never touched. stop puts the previous log.L back, unless log.L has been
// replaced meanwhile. Loggers taken from log.L while recording keep
// forwarding after stop. While recording, containerd/log's SetLevel,
// GetLevel and SetFormat act on the recording logger; lazybase sets them
// before NewDaemon. Replacing log.L is not synchronized with its readers,
// so recording starts and stops while the daemon is not serving.
//
// A per-access callback in stargz (for example a layer option
// WithFileAccessHook(func(layer digest.Digest, path string, size int64)))
// would replace this adapter: the callback would call recordAccess, and
// neither the message text, the field names nor log.L would matter.
type stargzAccessLog struct {
	rec     accessRecorder
	imageOf func(layer string) string
	prev    *log.Entry // log.L before recording
	entry   *log.Entry // log.L while recording

	mu       sync.Mutex
	stopped  bool
	recErred bool
}

// captureStargzAccess starts recording stargz's first-access entries in
// rec, naming each layer's image with imageOf ("" when unknown).
func captureStargzAccess(rec accessRecorder, imageOf func(layer string) string) *stargzAccessLog {
	prev := log.L
	lg := logrus.New()
	lg.SetOutput(io.Discard)
	lg.SetFormatter(discardFormatter{})
	lg.ExitFunc = prev.Logger.ExitFunc
	lg.SetLevel(max(prev.Logger.GetLevel(), logrus.DebugLevel))
	s := &stargzAccessLog{rec: rec, imageOf: imageOf, prev: prev}
	lg.AddHook(s)
	s.entry = logrus.NewEntry(lg).WithFields(prev.Data)
	log.L = s.entry
	return s
}

// stop stops recording. Entries still reaching the recording logger are
// forwarded to the process logger.
func (s *stargzAccessLog) stop() {
	s.mu.Lock()
	s.stopped = true
	s.mu.Unlock()
	if log.L == s.entry {
		log.L = s.prev
	}
}

// Levels are all levels: the hook forwards every entry.
func (s *stargzAccessLog) Levels() []logrus.Level { return logrus.AllLevels }

// Fire records e if it is a first-access entry and forwards it to the
// process logger.
func (s *stargzAccessLog) Fire(e *logrus.Entry) error {
	if e.Level == logrus.DebugLevel {
		if p, ok := strings.CutPrefix(e.Message, stargzAccessPrefix); ok {
			s.record(e, p)
		}
	}
	to := s.prev.Logger
	if to.IsLevelEnabled(e.Level) {
		to.WithFields(e.Data).WithTime(e.Time).WithContext(e.Context).Log(e.Level, e.Message)
	}
	return nil
}

func (s *stargzAccessLog) record(e *logrus.Entry, path string) {
	s.mu.Lock()
	stopped := s.stopped
	s.mu.Unlock()
	if stopped {
		return
	}
	layer, _ := e.Data["layer"].(string)
	rec := AccessRecord{Time: e.Time, Image: s.imageOf(layer), Layer: layer, Path: path}
	switch n := e.Data["size"].(type) {
	case int64:
		rec.Size = n
	case uint64:
		rec.Size = int64(n)
	case int:
		rec.Size = int64(n)
	}
	ctx := e.Context
	if ctx == nil {
		ctx = context.Background()
	}
	if err := s.rec.recordAccess(ctx, rec); err != nil {
		s.mu.Lock()
		first := !s.recErred
		s.recErred = true
		s.mu.Unlock()
		if first {
			s.prev.WithError(err).WithFields(log.Fields{"image": rec.Image, "layer": layer, "path": path}).
				Warn("recording file access failed; later failures are not logged")
		}
	}
}

// discardFormatter formats nothing: the recording logger's own output is
// discarded, the process logger formats what it forwards.
type discardFormatter struct{}

func (discardFormatter) Format(*logrus.Entry) ([]byte, error) { return nil, nil }
