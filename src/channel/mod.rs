//! The channels touchpoints deliver through, one file each: the wire format, signing, and what an
//! answer means for the batch. Nothing here knows about plans or the queue.

pub mod custom;
