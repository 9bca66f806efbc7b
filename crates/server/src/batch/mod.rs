//! Batch jobs (OpenAI's Batch API): uploaded JSONL files of requests, run in the background at
//! the lowest urgency inside the same continuous batch as interactive traffic, with every line's
//! state in a durable store so a restart loses nothing.

pub mod store;
