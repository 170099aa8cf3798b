//! qcow2-engine
