package queue

import "github.com/redis/go-redis/v9"

func redisZ(score float64, m string) redis.Z { return redis.Z{Score: score, Member: m} }
