"""Kafka in, decoded images out: consuming, decoding, limits, the dead-letter queue,
prefetching batches, the embedded broker and the image sources for `tailord produce`."""
