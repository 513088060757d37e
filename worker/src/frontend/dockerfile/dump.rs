//! A stable, readable text rendering of converted LLB and image config.
