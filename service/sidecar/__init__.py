"""hopgate in front of an upstream classifier: the gatekeeper (/score forwards ID images) and the
transparent proxy of the classifier's own routes."""
