"""The place index: named, durable indexes of place descriptors searched with faiss.

engine (one index in memory), store (log and snapshots), catalog (all indexes, the commit
thread), wire (messages), service and stream (the gRPC PlaceIndexService); docs/PLACES.md.
"""
