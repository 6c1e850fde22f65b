"""Operations: the control socket's server and the CLI's client of it, queue actions on a
stopped spool and the qshape summary; it steers the stages below it and is never called by
them."""
