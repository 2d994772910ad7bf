"""The features service: streaming online features into Redis from declarative definitions that
also run offline (see docs/features.md). Other services import only `client`."""
