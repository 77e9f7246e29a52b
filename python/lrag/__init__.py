"""lrag: the reference LongLive-RAG generator built on :mod:`lrag_ext` (arrives with the generator issue)."""
