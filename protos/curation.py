"""What a node's data curation looks like on the wire (JoinRequest.curation): the sha256 that
names its curation configuration (node/curation_config.py), or NO_CURATION."""

NO_CURATION = "none"  # what a node whose shards were not curated reports at Join
