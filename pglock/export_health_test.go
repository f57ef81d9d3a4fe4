package pglock

// FullCheckEvery exports fullCheckEvery to the tests.
const FullCheckEvery = fullCheckEvery
