"""Streams: event schemas and serde, topics, Kafka producer/consumer with DLQ, the stream generator.

The bottom layer: it imports nothing else of driftloop's (DESIGN.md, dependency rule).
"""
