package harness

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"html"
	"io"
	"math"
	"sort"
	"strings"
	"time"
)

// Span is one interval on a Timeline lane: a build step, a layer's
// background fetch, a guard transfer.
type Span struct {
	Label      string
	Start, End time.Time
}

// Lane is one row of a Timeline: spans of one kind of work. Spans that
// overlap are drawn on sub-rows of the lane.
type Lane struct {
	Name  string
	Spans []Span
}

// Timeline is a plot of what ran when during one build: lanes of spans
// against a time axis in seconds from Origin.
type Timeline struct {
	Title  string
	Origin time.Time // time 0 of the axis; the earliest span start when zero
	Lanes  []Lane
	// Notes are lines of text printed under the axis (figures too short
	// to see on it).
	Notes []string
}

// Layout of the SVG, in pixels.
const (
	tlLabelWidth = 190 // lane names
	tlPlotWidth  = 860
	tlRight      = 30
	tlTop        = 40 // title
	tlRowHeight  = 18
	tlRowGap     = 3
	tlLaneGap    = 10
	tlAxis       = 40 // below the lanes: ticks, their labels and the unit
	tlCharWidth  = 6.2
	tlFontSize   = 11
)

// tlColors colour the lanes in turn.
var tlColors = []string{"#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#b07aa1", "#edc948", "#9c755f"}

// Validate checks that the timeline can be drawn: at least one lane, and
// every span ending no earlier than it starts.
func (tl Timeline) Validate() error {
	if len(tl.Lanes) == 0 {
		return errors.New("timeline has no lanes")
	}
	for _, l := range tl.Lanes {
		if l.Name == "" {
			return errors.New("timeline lane without a name")
		}
		for _, s := range l.Spans {
			if s.Start.IsZero() || s.End.IsZero() {
				return fmt.Errorf("lane %q: span %q has no start or end", l.Name, s.Label)
			}
			if s.End.Before(s.Start) {
				return fmt.Errorf("lane %q: span %q ends (%s) before it starts (%s)", l.Name, s.Label, s.End.Format(time.RFC3339Nano), s.Start.Format(time.RFC3339Nano))
			}
		}
	}
	return nil
}

// span bounds of the whole timeline, from its origin.
func (tl Timeline) bounds() (origin time.Time, length time.Duration) {
	origin = tl.Origin
	var end time.Time
	for _, l := range tl.Lanes {
		for _, s := range l.Spans {
			if tl.Origin.IsZero() && (origin.IsZero() || s.Start.Before(origin)) {
				origin = s.Start
			}
			if s.End.After(end) {
				end = s.End
			}
		}
	}
	if end.After(origin) {
		length = end.Sub(origin)
	}
	return origin, length
}

// rows assigns each span of l (in start order) a sub-row: the first whose
// last span ended by the time it starts. It returns the spans sorted, their
// rows and the number of rows (at least 1).
func rows(l Lane) ([]Span, []int, int) {
	spans := append([]Span(nil), l.Spans...)
	sort.SliceStable(spans, func(i, j int) bool {
		if !spans[i].Start.Equal(spans[j].Start) {
			return spans[i].Start.Before(spans[j].Start)
		}
		return spans[i].End.Before(spans[j].End)
	})
	var ends []time.Time
	idx := make([]int, len(spans))
	for i, s := range spans {
		r := -1
		for k, e := range ends {
			if !s.Start.Before(e) {
				r = k
				break
			}
		}
		if r < 0 {
			r = len(ends)
			ends = append(ends, time.Time{})
		}
		ends[r] = s.End
		idx[i] = r
	}
	return spans, idx, max(len(ends), 1)
}

// tickStep returns a round step (1, 2 or 5 times a power of ten) in
// seconds that cuts length seconds into about 10 ticks.
func tickStep(length float64) float64 {
	if length <= 0 {
		return 1
	}
	raw := length / 10
	p := math.Pow(10, math.Floor(math.Log10(raw)))
	for _, m := range []float64{1, 2, 5, 10} {
		if m*p >= raw {
			return m * p
		}
	}
	return 10 * p
}

// num formats a coordinate or a second count the same way on every run.
func num(f float64) string {
	s := fmt.Sprintf("%.2f", f)
	s = strings.TrimRight(strings.TrimRight(s, "0"), ".")
	if s == "-0" {
		return "0"
	}
	return s
}

// WriteSVG draws the timeline as a standalone SVG document. The output
// depends only on the timeline: the same timeline gives the same bytes.
func (tl Timeline) WriteSVG(w io.Writer) error {
	if err := tl.Validate(); err != nil {
		return err
	}
	origin, length := tl.bounds()
	secs := length.Seconds()
	step := tickStep(secs)
	axisEnd := math.Ceil(secs/step) * step
	if axisEnd <= 0 {
		axisEnd = step
	}
	scale := tlPlotWidth / axisEnd // pixels per second
	x := func(t time.Time) float64 { return tlLabelWidth + t.Sub(origin).Seconds()*scale }

	var body bytes.Buffer
	y := float64(tlTop)
	for i, l := range tl.Lanes {
		spans, idx, n := rows(l)
		height := float64(n)*tlRowHeight + float64(n-1)*tlRowGap
		color := tlColors[i%len(tlColors)]
		fmt.Fprintf(&body, `<g class="lane" data-lane="%s">`+"\n", html.EscapeString(l.Name))
		fmt.Fprintf(&body, `<rect class="lane-bg" x="0" y="%s" width="%s" height="%s" fill="%s"/>`+"\n",
			num(y-tlLaneGap/2), num(tlLabelWidth+tlPlotWidth+tlRight), num(height+tlLaneGap), []string{"#f7f7f7", "#ffffff"}[i%2])
		fmt.Fprintf(&body, `<text class="lane-name" x="6" y="%s" font-size="%d">%s</text>`+"\n",
			num(y+tlRowHeight-5), tlFontSize+1, html.EscapeString(l.Name))
		if len(spans) == 0 {
			fmt.Fprintf(&body, `<text class="none" x="%d" y="%s" font-size="%d" fill="#888">(none)</text>`+"\n",
				tlLabelWidth+4, num(y+tlRowHeight-5), tlFontSize)
		}
		for k, s := range spans {
			x0, x1 := x(s.Start), x(s.End)
			// The next span on the same row bounds a label drawn
			// after this one.
			room := float64(tlLabelWidth + tlPlotWidth + tlRight)
			for m := k + 1; m < len(spans); m++ {
				if idx[m] == idx[k] {
					room = x(spans[m].Start)
					break
				}
			}
			wd := math.Max(x1-x0, 1)
			ry := y + float64(idx[k])*(tlRowHeight+tlRowGap)
			tip := fmt.Sprintf("%s: %s s – %s s (%s s)", s.Label, num(s.Start.Sub(origin).Seconds()), num(s.End.Sub(origin).Seconds()), num(s.End.Sub(s.Start).Seconds()))
			fmt.Fprintf(&body, `<rect class="span" x="%s" y="%s" width="%s" height="%d" fill="%s"><title>%s</title></rect>`+"\n",
				num(x0), num(ry), num(wd), tlRowHeight, color, html.EscapeString(tip))
			if label := s.Label; label != "" && float64(len(label))*tlCharWidth+6 <= wd {
				fmt.Fprintf(&body, `<text class="span-label" x="%s" y="%s" font-size="%d" fill="#fff">%s</text>`+"\n",
					num(x0+3), num(ry+tlRowHeight-5), tlFontSize, html.EscapeString(label))
			} else if label != "" && x1+3+float64(len(label))*tlCharWidth+3 <= room {
				fmt.Fprintf(&body, `<text class="span-label" x="%s" y="%s" font-size="%d" fill="#333">%s</text>`+"\n",
					num(x1+3), num(ry+tlRowHeight-5), tlFontSize, html.EscapeString(label))
			}
		}
		body.WriteString("</g>\n")
		y += height + tlLaneGap
	}
	lanesEnd := y
	// The time axis: a line, ticks with labels in seconds, grid lines.
	fmt.Fprintf(&body, `<g class="axis"><line x1="%d" y1="%s" x2="%d" y2="%s" stroke="#333"/>`+"\n",
		tlLabelWidth, num(lanesEnd), tlLabelWidth+tlPlotWidth, num(lanesEnd))
	for i := 0; float64(i)*step <= axisEnd+step/1e6; i++ {
		s := float64(i) * step
		tx := tlLabelWidth + s*scale
		fmt.Fprintf(&body, `<line class="grid" x1="%s" y1="%d" x2="%s" y2="%s" stroke="#ccc" stroke-dasharray="2,3"/>`+"\n",
			num(tx), tlTop-6, num(tx), num(lanesEnd))
		fmt.Fprintf(&body, `<text class="tick" x="%s" y="%s" font-size="%d" text-anchor="middle">%s</text>`+"\n",
			num(tx), num(lanesEnd+15), tlFontSize, num(s))
	}
	fmt.Fprintf(&body, `<text class="unit" x="%d" y="%s" font-size="%d" text-anchor="middle">seconds since the build started</text></g>`+"\n",
		tlLabelWidth+tlPlotWidth/2, num(lanesEnd+32), tlFontSize)

	for i, n := range tl.Notes {
		fmt.Fprintf(&body, `<text class="note" x="6" y="%s" font-size="%d">%s</text>`+"\n",
			num(lanesEnd+tlAxis+float64(i+1)*(tlFontSize+5)), tlFontSize, html.EscapeString(n))
	}
	width := tlLabelWidth + tlPlotWidth + tlRight
	height := lanesEnd + tlAxis + float64(len(tl.Notes))*(tlFontSize+5)
	if len(tl.Notes) > 0 {
		height += 8
	}
	var out bytes.Buffer
	fmt.Fprintf(&out, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%s" viewBox="0 0 %d %s" font-family="sans-serif">`+"\n",
		width, num(height), width, num(height))
	fmt.Fprintf(&out, `<rect x="0" y="0" width="%d" height="%s" fill="#fff"/>`+"\n", width, num(height))
	fmt.Fprintf(&out, `<text class="title" x="6" y="20" font-size="%d" font-weight="bold">%s</text>`+"\n", tlFontSize+3, html.EscapeString(tl.Title))
	out.Write(body.Bytes())
	out.WriteString("</svg>\n")
	_, err := w.Write(out.Bytes())
	return err
}

// BuildStep is one vertex of a BuildKit solve, from buildctl's
// --progress=rawjson output.
type BuildStep struct {
	Digest    string
	Name      string
	Started   time.Time
	Completed time.Time
	Cached    bool
	// Statuses are the vertex's progress items that started and
	// completed (e.g. "exporting layers", "pushing layers" of an
	// export), by their ID, in order of start.
	Statuses []BuildStep
}

// ParseBuildSteps reads buildctl's --progress=rawjson output (a stream of
// JSON solve statuses) and returns each vertex that started and
// completed, with its earliest start and latest completion, in order of
// start (then name).
func ParseBuildSteps(rawjson string) ([]BuildStep, error) {
	type vertex struct {
		Digest    string     `json:"digest"`
		Name      string     `json:"name"`
		Started   *time.Time `json:"started"`
		Completed *time.Time `json:"completed"`
		Cached    bool       `json:"cached"`
	}
	type status struct {
		ID        string     `json:"id"`
		Vertex    string     `json:"vertex"`
		Started   *time.Time `json:"started"`
		Completed *time.Time `json:"completed"`
	}
	byDigest := map[string]*BuildStep{}
	statuses := map[[2]string]*BuildStep{}
	widen := func(s *BuildStep, started, completed *time.Time) {
		if started != nil && (s.Started.IsZero() || started.Before(s.Started)) {
			s.Started = *started
		}
		if completed != nil && completed.After(s.Completed) {
			s.Completed = *completed
		}
	}
	dec := json.NewDecoder(strings.NewReader(rawjson))
	for {
		var st struct {
			Vertexes []vertex `json:"vertexes"`
			Statuses []status `json:"statuses"`
		}
		err := dec.Decode(&st)
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("decoding buildctl rawjson progress: %w", err)
		}
		for _, v := range st.Vertexes {
			s := byDigest[v.Digest]
			if s == nil {
				s = &BuildStep{Digest: v.Digest, Name: v.Name}
				byDigest[v.Digest] = s
			}
			s.Cached = s.Cached || v.Cached
			widen(s, v.Started, v.Completed)
		}
		for _, v := range st.Statuses {
			key := [2]string{v.Vertex, v.ID}
			s := statuses[key]
			if s == nil {
				s = &BuildStep{Digest: v.Vertex, Name: v.ID}
				statuses[key] = s
			}
			widen(s, v.Started, v.Completed)
		}
	}
	sortSteps := func(out []BuildStep) {
		sort.Slice(out, func(i, j int) bool {
			if !out[i].Started.Equal(out[j].Started) {
				return out[i].Started.Before(out[j].Started)
			}
			return out[i].Name < out[j].Name
		})
	}
	for _, st := range statuses {
		if v := byDigest[st.Digest]; v != nil && !st.Started.IsZero() && !st.Completed.IsZero() {
			v.Statuses = append(v.Statuses, *st)
		}
	}
	var out []BuildStep
	for _, s := range byDigest {
		if !s.Started.IsZero() && !s.Completed.IsZero() {
			out = append(out, *s)
		}
	}
	sortSteps(out)
	for i := range out {
		sortSteps(out[i].Statuses)
	}
	return out, nil
}
