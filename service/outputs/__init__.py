"""What the service emits: derived identities, coded concepts, SR / SEG / SC builders, PACS dispatch."""
