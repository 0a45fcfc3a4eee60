//! Cluster formation (see issue 4).
