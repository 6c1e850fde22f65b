"""Operations: the admin socket's server and client, the operator's queue actions and the
queue summary; it steers the stages below it and is never called by them."""
