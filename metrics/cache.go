package metrics

import (
	"sync"
	"time"
)

// DefaultMaxAge is how old a map read may be and still serve a scrape.
// Scrapes that arrive while a read is in progress, or within DefaultMaxAge
// of it, share that read: every Prometheus server scraping ktel sees data at
// most this old, and the maps are read at most once per DefaultMaxAge
// whatever the number of scrapers.
const DefaultMaxAge = time.Second

// Cached shares one read among concurrent and rapid callers.
type Cached[T any] struct {
	read   func() (T, error)
	maxAge time.Duration
	now    func() time.Time

	mu  sync.Mutex
	val T
	at  time.Time
}

// NewCached returns a Cached over read.
func NewCached[T any](read func() (T, error), maxAge time.Duration) *Cached[T] {
	return &Cached[T]{read: read, maxAge: maxAge, now: time.Now}
}

// Get returns the last value if it is younger than maxAge, and otherwise
// reads anew. Holding the lock during the read makes concurrent callers
// wait for it and share its result. Errors are not cached.
func (c *Cached[T]) Get() (T, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.at.IsZero() && c.now().Sub(c.at) < c.maxAge {
		return c.val, nil
	}
	v, err := c.read()
	if err != nil {
		var zero T
		return zero, err
	}
	c.val, c.at = v, c.now()
	return v, nil
}

// Invalidate makes the next Get read anew: the caller changed the source
// in a way the last value does not show (deleted entries of a map).
func (c *Cached[T]) Invalidate() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.at = time.Time{}
}
