//! Bundled profiles (filled in by the profiles work).
