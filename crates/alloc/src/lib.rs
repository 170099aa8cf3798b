//! qcow2-alloc
