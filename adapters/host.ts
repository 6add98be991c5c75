/** This process as a lease owner, and whether another process on this host is still alive. */
import { hostname } from 'node:os';
import type { HostInfo } from '../engine/deps.ts';

export const localHost: HostInfo = {
  name: hostname(),
  pid: process.pid,
  isAlive(pid: number): boolean {
    if (!Number.isInteger(pid) || pid <= 0) return false;
    try {
      process.kill(pid, 0);
      return true;
    } catch (error) {
      // EPERM: the process exists but belongs to another user.
      return (error as NodeJS.ErrnoException).code === 'EPERM';
    }
  },
};
