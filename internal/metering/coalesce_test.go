package metering

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestCoalescerBatchesWhileBusy holds the only worker in its first call, so
// the calls that arrive meanwhile must run together as one batch.
func TestCoalescerBatchesWhileBusy(t *testing.T) {
	t.Parallel()
	release := make(chan struct{})
	var sizes []int
	var mu sync.Mutex
	c := newCoalescer(1, 100,
		func(_ context.Context, in int) (int, error) {
			<-release
			return in * 10, nil
		},
		func(_ context.Context, in []int) ([]int, error) {
			out := make([]int, len(in))
			for i, v := range in {
				out[i] = v * 10
			}
			return out, nil
		})
	c.observe = func(size int) {
		mu.Lock()
		defer mu.Unlock()
		sizes = append(sizes, size)
	}
	t.Cleanup(c.close)

	results := make([]int, 11)
	var wg sync.WaitGroup
	wg.Go(func() { results[0], _ = c.do(t.Context(), 0) })
	require.Eventually(t, func() bool { mu.Lock(); defer mu.Unlock(); return len(sizes) == 1 }, time.Second, time.Millisecond)
	for i := 1; i <= 10; i++ {
		wg.Go(func() { results[i], _ = c.do(t.Context(), i) })
	}
	require.Eventually(t, func() bool { return len(c.queue) == 10 }, time.Second, time.Millisecond)
	close(release)
	wg.Wait()

	assert.Equal(t, []int{1, 10}, sizes)
	for i, r := range results {
		assert.Equal(t, i*10, r)
	}
}

// TestCoalescerFallsBackToSingleCalls makes every batch fail, as a batch
// does when one of its calls raises an error, and expects each call to run
// again on its own.
func TestCoalescerFallsBackToSingleCalls(t *testing.T) {
	t.Parallel()
	release := make(chan struct{})
	first := true
	var mu sync.Mutex
	c := newCoalescer(1, 100,
		func(_ context.Context, in int) (int, error) {
			mu.Lock()
			wait := first
			first = false
			mu.Unlock()
			if wait {
				<-release
			}
			if in == 3 {
				return 0, errors.New("bad call")
			}
			return in, nil
		},
		func(context.Context, []int) ([]int, error) { return nil, errors.New("batch failed") })
	t.Cleanup(c.close)

	errs := make([]error, 6)
	var wg sync.WaitGroup
	wg.Go(func() { _, errs[0] = c.do(t.Context(), 0) })
	require.Eventually(t, func() bool { mu.Lock(); defer mu.Unlock(); return !first }, time.Second, time.Millisecond)
	for i := 1; i < len(errs); i++ {
		wg.Go(func() { _, errs[i] = c.do(t.Context(), i) })
	}
	require.Eventually(t, func() bool { return len(c.queue) == 5 }, time.Second, time.Millisecond)
	close(release)
	wg.Wait()

	for i, err := range errs {
		if i == 3 {
			assert.EqualError(t, err, "bad call")
			continue
		}
		assert.NoError(t, err, "call %d", i)
	}
}

func TestCoalescerUnavailableFailsWholeBatch(t *testing.T) {
	t.Parallel()
	release := make(chan struct{})
	var once sync.Once
	started := make(chan struct{})
	singles := 0
	var mu sync.Mutex
	c := newCoalescer(1, 100,
		func(context.Context, int) (int, error) {
			once.Do(func() { close(started); <-release })
			mu.Lock()
			singles++
			mu.Unlock()
			return 0, nil
		},
		func(context.Context, []int) ([]int, error) { return nil, fmt.Errorf("%w: down", ErrUnavailable) })
	t.Cleanup(c.close)

	var wg sync.WaitGroup
	wg.Go(func() { _, _ = c.do(t.Context(), 0) })
	<-started
	errs := make([]error, 4)
	for i := range errs {
		wg.Go(func() { _, errs[i] = c.do(t.Context(), i+1) })
	}
	require.Eventually(t, func() bool { return len(c.queue) == 4 }, time.Second, time.Millisecond)
	close(release)
	wg.Wait()

	for _, err := range errs {
		assert.ErrorIs(t, err, ErrUnavailable)
	}
	assert.Equal(t, 1, singles, "an unavailable database is not retried call by call")
}

func TestCoalescerDropsCancelledCalls(t *testing.T) {
	t.Parallel()
	release := make(chan struct{})
	var ran []int
	var mu sync.Mutex
	started := make(chan struct{})
	var once sync.Once
	c := newCoalescer(1, 100,
		func(_ context.Context, in int) (int, error) {
			once.Do(func() { close(started); <-release })
			mu.Lock()
			ran = append(ran, in)
			mu.Unlock()
			return in, nil
		},
		func(_ context.Context, in []int) ([]int, error) {
			mu.Lock()
			ran = append(ran, in...)
			mu.Unlock()
			return in, nil
		})
	t.Cleanup(c.close)

	var wg sync.WaitGroup
	wg.Go(func() { _, _ = c.do(t.Context(), 0) })
	<-started
	ctx, cancel := context.WithCancel(t.Context())
	var cancelledErr error
	wg.Go(func() { _, cancelledErr = c.do(ctx, 1) })
	wg.Go(func() { _, _ = c.do(t.Context(), 2) })
	require.Eventually(t, func() bool { return len(c.queue) == 2 }, time.Second, time.Millisecond)
	cancel()
	close(release)
	wg.Wait()

	assert.ErrorIs(t, cancelledErr, context.Canceled)
	mu.Lock()
	defer mu.Unlock()
	assert.Equal(t, []int{0, 2}, ran, "a call whose caller gave up before its batch started is not run")
}

func TestCoalescerCloseRejectsNewCalls(t *testing.T) {
	t.Parallel()
	c := newCoalescer(2, 10,
		func(_ context.Context, in int) (int, error) { return in, nil },
		func(_ context.Context, in []int) ([]int, error) { return in, nil })

	c.close()
	_, err := c.do(t.Context(), 1)

	assert.ErrorIs(t, err, ErrUnavailable)
}
