package callstate_test

import (
	"time"

	"github.com/redis/go-redis/v9"
)

type redisClient = redis.Client

// newDead returns a client of an address where nothing listens.
func newDead() *redis.Client {
	return redis.NewClient(&redis.Options{Addr: "127.0.0.1:1", DialTimeout: 100 * time.Millisecond, MaxRetries: -1})
}
