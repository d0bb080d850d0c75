"""hopgate's own HTTP routes over the scoring core: /score, /memories, operations, the page."""
