//! Filesystem storage (skeleton; filled by the storage issue).
