#![no_std]
// The programs live in main.rs (the `zt` binary); this library exists so that zt-daemon can
// declare a build-dependency on this crate and be rebuilt when it changes.
