/* System calls through a foreign ABI on x86_64, from inside a job box (tests/test_box.py).
 *
 * x32:  getpid with __X32_SYSCALL_BIT set (nr | 0x40000000), through `syscall`;
 * i386: getpid (32-bit number 20) through `int $0x80`, the IA-32 emulation entry.
 * Each runs in a forked child; one line each, as boxprobe.py prints them:
 *   RESULT <abi> ok <pid>        a real answer (the call got through)
 *   RESULT <abi> errno <ENAME>   refused
 *   RESULT <abi> killed <signal> the child died
 * then DONE. Built by the test with gcc into the trusted probe folder.
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static const char *errname(long e) {
    switch (e) {
    case EPERM: return "EPERM";
    case ENOSYS: return "ENOSYS";
    case EACCES: return "EACCES";
    case EFAULT: return "EFAULT";
    case EINVAL: return "EINVAL";
    default: return "OTHER";
    }
}

static long x32_getpid(void) {
    long ret;
    __asm__ volatile("syscall" : "=a"(ret) : "a"(0x40000000L | 39L) : "rcx", "r11", "memory");
    return ret;
}

static long i386_getpid(void) {
    long ret;
    __asm__ volatile("int $0x80" : "=a"(ret) : "a"(20L) : "memory");
    return ret;
}

static void probe(const char *name, long (*call)(void)) {
    int fds[2];
    char buf[128] = {0};
    if (pipe(fds) != 0) {
        printf("RESULT %s error pipe\n", name);
        return;
    }
    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0) {
        long r = call();
        if (r == (long)getpid())
            snprintf(buf, sizeof buf, "ok %ld", r);
        else if (r < 0 && r > -4096)
            snprintf(buf, sizeof buf, "errno %s", errname(-r));
        else
            snprintf(buf, sizeof buf, "ok unexpected %ld", r);
        if (write(fds[1], buf, strlen(buf)) < 0)
            _exit(2);
        _exit(0);
    }
    close(fds[1]);
    ssize_t n = read(fds[0], buf, sizeof buf - 1);
    close(fds[0]);
    int status = 0;
    waitpid(pid, &status, 0);
    if (WIFSIGNALED(status))
        printf("RESULT %s killed %s\n", name, strsignal(WTERMSIG(status)));
    else
        printf("RESULT %s %s\n", name, n > 0 ? buf : "error no result");
}

int main(void) {
    probe("x32", x32_getpid);
    probe("i386", i386_getpid);
    printf("DONE\n");
    return 0;
}
