package lazypull

import (
	"encoding/json"
	"fmt"
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

// upstreamAccessPrefix starts the message the upstream filesystem logs, at
// debug level, on the first open of each file of a mounted layer when its
// log_file_access option is on.
const upstreamAccessPrefix = "file accessed: "

// accessRecorder turns the upstream filesystem's first-access log entries
// into per-image JSON-lines files: dir/<image>.jsonl, one AccessRecord per
// file, in first-access order.
//
// The upstream entries are logged at debug level on the global logger, so
// while recording, the logger runs at debug level and a formatter wrapper
// drops every entry below the level that was configured before.
type accessRecorder struct {
	dir string
	fs  *trackingFS

	mu    sync.Mutex
	files map[string]*os.File

	logger    *logrus.Logger
	oldLevel  logrus.Level
	oldFormat logrus.Formatter
	oldHooks  logrus.LevelHooks
}

func startAccessRecorder(dir string, fs *trackingFS) (*accessRecorder, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("access record directory %s: %w", dir, err)
	}
	lg := log.L.Logger
	r := &accessRecorder{dir: dir, fs: fs, files: map[string]*os.File{}, logger: lg}
	r.oldLevel = lg.GetLevel()
	r.oldFormat = lg.Formatter
	hooks := make(logrus.LevelHooks, len(lg.Hooks))
	for l, hs := range lg.Hooks {
		hooks[l] = append([]logrus.Hook(nil), hs...)
	}
	r.oldHooks = hooks
	lg.SetFormatter(&levelFilter{Formatter: r.oldFormat, level: r.oldLevel})
	lg.AddHook(r)
	if r.oldLevel < logrus.DebugLevel {
		lg.SetLevel(logrus.DebugLevel)
	}
	return r, nil
}

// stop restores the logger and closes the record files.
func (r *accessRecorder) stop() error {
	r.logger.ReplaceHooks(r.oldHooks)
	r.logger.SetFormatter(r.oldFormat)
	r.logger.SetLevel(r.oldLevel)
	r.mu.Lock()
	defer r.mu.Unlock()
	var first error
	for _, f := range r.files {
		if err := f.Close(); err != nil && first == nil {
			first = err
		}
	}
	r.files = map[string]*os.File{}
	return first
}

// Levels is the level the upstream access entries are logged at.
func (r *accessRecorder) Levels() []logrus.Level { return []logrus.Level{logrus.DebugLevel} }

// Fire records an upstream first-access entry.
func (r *accessRecorder) Fire(e *logrus.Entry) error {
	p, ok := strings.CutPrefix(e.Message, upstreamAccessPrefix)
	if !ok {
		return nil
	}
	layer, _ := e.Data["layer"].(string)
	rec := AccessRecord{Time: e.Time, Layer: layer, Path: p, Image: r.fs.imageOf(layer)}
	switch s := e.Data["size"].(type) {
	case int64:
		rec.Size = s
	case uint64:
		rec.Size = int64(s)
	case int:
		rec.Size = int64(s)
	}
	b, err := json.Marshal(rec)
	if err != nil {
		return err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	f, ok := r.files[rec.Image]
	if !ok {
		name := AccessRecordFile(rec.Image)
		if f, err = os.OpenFile(filepath.Join(r.dir, name), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600); err != nil {
			return fmt.Errorf("access record for %s: %w", rec.Image, err)
		}
		r.files[rec.Image] = f
	}
	_, err = f.Write(append(b, '\n'))
	return err
}

// AccessRecordFile is the name of the access record file of image in the
// access record directory (prefetch.RecordFileName).
func AccessRecordFile(image string) string { return prefetch.RecordFileName(image) }

// levelFilter formats only entries at or above level; the others become
// empty writes.
type levelFilter struct {
	logrus.Formatter
	level logrus.Level
}

func (f *levelFilter) Format(e *logrus.Entry) ([]byte, error) {
	if e.Level > f.level {
		return nil, nil
	}
	return f.Formatter.Format(e)
}
