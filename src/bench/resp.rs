//! A minimal RESP client for the Redis comparison.
