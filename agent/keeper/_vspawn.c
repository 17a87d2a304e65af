/* agent.keeper._vspawn: the job spawner's vfork path (see agent/keeper/vspawn.py).
 *
 * One function, spawn(), that starts one job with clone(CLONE_VM | CLONE_VFORK)
 * on a stack of its own (as glibc's posix_spawn does) and runs the same child
 * set-up as the Python fork path (agent.keeper.childsetup.child), in the same
 * order, before execve / execveat. The Python side (vspawn.py) turns a plan into
 * the arrays below and names every step; this file only executes them.
 *
 * Why vfork: os.fork() in a Python process of ~12 MB copies its page tables and
 * then takes copy-on-write faults for everything the Python child touches (about
 * 0.75 ms of spawner CPU a job). A CLONE_VM child shares the parent's memory and
 * the parent sleeps until the child has exec'd or exited, so none of that is paid.
 *
 * The price of sharing memory: between clone and exec the child may only run
 * code that touches nothing of the parent's but what was prepared for it.
 *   - Everything (argv, envp, the op list, paths, Landlock attributes) is built
 *     in the parent before the clone; the child calls no malloc, no Python, no
 *     stdio, nothing that takes a lock: only system calls, through syscall(2) and
 *     a few async-signal-safe wrappers.
 *   - Credentials change through raw syscall(SYS_setresuid, ...) and friends,
 *     never glibc's setresuid(): the glibc wrappers broadcast the change to every
 *     thread they believe the process has (the parent's thread list, shared in
 *     memory), which is wrong and can hang in a CLONE_VM child. The kernel call
 *     changes exactly the calling thread, which is the whole child process.
 *   - The parent blocks every signal (the raw rt_sigprocmask, so glibc's
 *     internal ones too) around the clone: a handler of the parent's (CPython's C
 *     trip_signal) run in the child would write to the parent's memory and
 *     report a signal the parent never got. The child inherits the full mask,
 *     resets every handled signal to SIG_DFL and only then unmasks.
 *   - errno is the parent's thread-local variable (no CLONE_SETTLS): the
 *     parent is suspended meanwhile, and reads its own errno only after.
 *   - The report (step index and errno) goes to a struct in the parent's
 *     memory, as glibc's spawni does; the parent reads it once clone returns.
 *     A child killed before exec leaves it empty and is seen as started: its
 *     exit is then reported by the normal reaping, like any other job's death.
 * The descriptor table and the signal handler table are the child's own copies
 * (no CLONE_FILES, no CLONE_SIGHAND): closing and resetting there never touches
 * the parent's.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <string.h>
#include <sys/ipc.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <unistd.h>

#ifndef SYS_close_range
#define SYS_close_range 436
#endif
#ifndef SYS_execveat
#error "execveat(2) is needed"
#endif
#ifndef AT_EMPTY_PATH
#define AT_EMPTY_PATH 0x1000
#endif
/* The generic syscall table numbers (agent.keeper.landlock uses the same). */
#define NR_LANDLOCK_CREATE_RULESET 444
#define NR_LANDLOCK_ADD_RULE 445
#define NR_LANDLOCK_RESTRICT_SELF 446

/* Descriptors the job gets are 0-4 (see spawner.FIRST_FREE_FD). */
#define FIRST_FREE_FD 5

/* Op codes: keep in step with agent/keeper/vspawn.py. */
enum {
    OP_SETSID = 1,
    OP_CGROUP_JOIN = 2,  /* write "0" to the moved cgroup.procs descriptor */
    OP_SETRLIMIT = 3,    /* a = resource, b = soft, c = hard */
    OP_UMASK = 4,        /* a = mask */
    OP_CHDIR = 5,        /* data = path */
    OP_SETGROUPS0 = 6,   /* setgroups(0, NULL) */
    OP_SETRESGID = 7,    /* a = gid */
    OP_SETRESUID = 8,    /* a = uid */
    OP_PRCTL = 9,        /* prctl(a, b, c, 0, 0) */
    OP_CAPSET = 10,      /* data = header (8 bytes) + 2 data structs (24 bytes) */
    OP_FAIL = 11,        /* fail with errno a */
    OP_LL_CREATE = 12,   /* landlock_create_ruleset(data, a, 0) -> the current ruleset */
    OP_LL_ADD = 13,      /* landlock_add_rule(current, a, data, 0) */
    OP_LL_OPEN_ADD = 14, /* open data O_PATH, fstat, readlink, add with a (dir) / b (file) */
    OP_LL_RESTRICT = 15, /* landlock_restrict_self(a, or the current ruleset if a < 0) */
    OP_LL_CLOSE = 16,    /* close the current ruleset */
    OP_SECCOMP = 17,     /* seccomp(a = its number, SET_MODE_FILTER, b = flags, data = BPF);
                          * c >= 0: send the returned listener over socket c, then close it */
    OP_NEW_SESSION_KEYRING = 18, /* keyctl(KEYCTL_JOIN_SESSION_KEYRING, NULL) */
};

/* Fixed steps (negative report codes); named in vspawn.py. */
enum {
    STEP_SETUP = -1,
    STEP_SIGNALS = -2,
    STEP_DEVNULL = -3,
    STEP_DUP2 = -4,
    STEP_CLOSE = -5,
    STEP_EXECVE = -6,
};

typedef struct {
    int code;
    int step;
    long long a, b, c;
    const char *data;
    Py_ssize_t len;
} op_t;

typedef struct {
    const char *path;     /* NULL: execveat of the exec descriptor */
    char *const *argv;
    char *const *envp;
    int fds[4];           /* stdout, exec, script, cgroup; -1 absent */
    const int *keep;      /* left where they are (Landlock descriptors), sorted */
    Py_ssize_t nkeep;
    const int *keep_first; /* keep and the job's descriptors, sorted: the first close */
    Py_ssize_t nkeep_first;
    const op_t *pre;      /* setsid .. user switch */
    Py_ssize_t npre;
    const op_t *confine;  /* Landlock or no_new_privs */
    Py_ssize_t nconfine;
    const int *reset;     /* signals reset to SIG_DFL (the spawner's non-default ones) */
    Py_ssize_t nreset;
    /* The report, written by the child in the parent's memory. */
    volatile int fail_step;
    volatile int fail_errno;
    volatile int failed;
} job_t;

static long sys_close_range(unsigned lo, unsigned hi) {
    return syscall(SYS_close_range, lo, hi, 0);
}

/* Close every descriptor from lo up except the sorted keep[], as os.closerange() in
 * spawner._close_all_but. close_range(2) where the kernel has it (5.9+); without it,
 * one close() per number up to the soft RLIMIT_NOFILE (the fork path's bound). */
static int close_all_but(const int *keep, Py_ssize_t nkeep, int lo) {
    for (Py_ssize_t i = 0; i < nkeep; i++) {
        int fd = keep[i];
        if (fd < lo)
            continue;
        if (fd > lo && sys_close_range((unsigned)lo, (unsigned)fd - 1) < 0) {
            if (errno != ENOSYS)
                return -1;
            for (int x = lo; x < fd; x++)
                close(x);
        }
        lo = fd + 1;
    }
    if (sys_close_range((unsigned)lo, ~0U) < 0) {
        if (errno != ENOSYS)
            return -1;
        struct rlimit rl;
        long top = 1 << 20;
        if (syscall(SYS_getrlimit, RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY)
            top = (long)rl.rlim_cur;
        for (long x = lo; x < top; x++)
            close((int)x);
    }
    return 0;
}

/* "/proc/self/fd/N" into buf, without snprintf (not async-signal-safe). */
static void fd_path(char *buf, int fd) {
    static const char prefix[] = "/proc/self/fd/";
    char digits[16];
    int n = 0;
    memcpy(buf, prefix, sizeof prefix - 1);
    do {
        digits[n++] = (char)('0' + fd % 10);
        fd /= 10;
    } while (fd > 0 && n < (int)sizeof digits);
    char *p = buf + sizeof prefix - 1;
    while (n > 0)
        *p++ = digits[--n];
    *p = '\0';
}

/* Run an op list; on failure returns -1 with *step set and errno the kernel's. */
static int run_ops(const op_t *ops, Py_ssize_t n, int cgroup_fd, int *step) {
    int cur = -1; /* the ruleset being built (close-on-exec) */
    for (Py_ssize_t i = 0; i < n; i++) {
        const op_t *op = &ops[i];
        long r = 0;
        *step = op->step;
        switch (op->code) {
        case OP_SETSID:
            r = syscall(SYS_setsid);
            break;
        case OP_CGROUP_JOIN:
            /* "0" means the writer itself: the child joins before anything else. */
            r = syscall(SYS_write, cgroup_fd, "0", 1);
            break;
        case OP_SETRLIMIT: {
            /* prlimit64 on ourselves is setrlimit; struct rlimit is the 64-bit one on
             * every 64-bit architecture (and the generic table has no setrlimit on some). */
            struct rlimit rl = {(rlim_t)op->b, (rlim_t)op->c};
            r = syscall(SYS_prlimit64, 0, (int)op->a, &rl, NULL);
            break;
        }
        case OP_UMASK:
            syscall(SYS_umask, (mode_t)op->a);
            break;
        case OP_CHDIR:
            r = syscall(SYS_chdir, op->data);
            break;
        case OP_SETGROUPS0:
            /* Raw: see the file's comment on glibc's set*id broadcast. */
            r = syscall(SYS_setgroups, 0, NULL);
            break;
        case OP_SETRESGID:
            r = syscall(SYS_setresgid, (gid_t)op->a, (gid_t)op->a, (gid_t)op->a);
            break;
        case OP_SETRESUID:
            r = syscall(SYS_setresuid, (uid_t)op->a, (uid_t)op->a, (uid_t)op->a);
            break;
        case OP_PRCTL:
            r = syscall(SYS_prctl, (unsigned long)op->a, (unsigned long)op->b,
                        (unsigned long)op->c, 0UL, 0UL);
            break;
        case OP_NEW_SESSION_KEYRING:
            /* An anonymous session keyring of the job's own (it answers its id). Where
             * keyctl is refused to this process (a container's filter: systemd-nspawn
             * refuses it), it is refused to the job too: no keyring to share. */
            r = syscall(SYS_keyctl, 1 /* KEYCTL_JOIN_SESSION_KEYRING */, NULL);
            if (r >= 0 || errno == ENOSYS || errno == EPERM)
                r = 0;
            break;
        case OP_CAPSET:
            /* header {version, pid 0} then the two 32-bit halves of the sets */
            r = syscall(SYS_capset, op->data, op->data + 8);
            break;
        case OP_FAIL:
            errno = (int)op->a;
            r = -1;
            break;
        case OP_LL_CREATE:
            r = syscall(NR_LANDLOCK_CREATE_RULESET, op->data, (size_t)op->a, 0U);
            if (r >= 0)
                cur = (int)r;
            break;
        case OP_LL_ADD:
            r = syscall(NR_LANDLOCK_ADD_RULE, cur, (int)op->a, op->data, 0U);
            break;
        case OP_LL_OPEN_ADD: {
            /* A rule the spawner could not resolve for the child (/proc/self...):
             * opened here, in the job's own process, as Prepared._add_opened does. */
            struct {
                unsigned long long allowed;
                int fd;
            } __attribute__((packed)) beneath;
            struct stat st;
            char link[32], real[256];
            int fd = (int)syscall(SYS_openat, AT_FDCWD, op->data, O_PATH | O_CLOEXEC);
            if (fd < 0)
                return -1; /* step: open PATH */
            *step = op->step + 1; /* fstat: the bare "landlock" step */
            if (fstat(fd, &st) < 0)
                goto ll_fail;
            *step = op->step + 2;
            fd_path(link, fd);
            if (syscall(SYS_readlink, link, real, sizeof real) < 0 && errno != ENAMETOOLONG)
                goto ll_fail;
            *step = op->step + 3;
            beneath.allowed = (unsigned long long)(S_ISDIR(st.st_mode) ? op->a : op->b);
            beneath.fd = fd;
            r = syscall(NR_LANDLOCK_ADD_RULE, cur, 1 /* PATH_BENEATH */, &beneath, 0U);
            if (r < 0)
                goto ll_fail;
            close(fd);
            break;
        ll_fail: {
            int e = errno;
            close(fd);
            errno = e;
            return -1;
        }
        }
        case OP_LL_RESTRICT:
            r = syscall(NR_LANDLOCK_RESTRICT_SELF, op->a >= 0 ? (int)op->a : cur, 0U);
            break;
        case OP_LL_CLOSE:
            if (cur >= 0)
                close(cur);
            cur = -1;
            break;
        case OP_SECCOMP: {
            /* struct sock_fprog, spelled out: the program was compiled by libseccomp in
             * the spawner (agent.keeper.seccomp); the child only installs it. */
            struct {
                unsigned short len;
                const void *filter;
            } prog = {(unsigned short)(op->len / 8), op->data};
            r = syscall((long)op->a, 1L /* SECCOMP_SET_MODE_FILTER */, (unsigned long)op->b,
                        &prog);
            if (r >= 0 && op->c >= 0) {
                /* The user-notification listener goes to the spawner (SCM_RIGHTS over
                 * a close-on-exec socket made for this job): the job never holds it. */
                int lfd = (int)r;
                char byte = 'L';
                struct iovec iov = {&byte, 1};
                union {
                    struct cmsghdr h;
                    char buf[CMSG_SPACE(sizeof(int))];
                } ctl;
                struct msghdr msg;
                memset(&msg, 0, sizeof msg);
                memset(&ctl, 0, sizeof ctl);
                msg.msg_iov = &iov;
                msg.msg_iovlen = 1;
                msg.msg_control = ctl.buf;
                msg.msg_controllen = sizeof ctl.buf;
                struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
                c->cmsg_level = SOL_SOCKET;
                c->cmsg_type = SCM_RIGHTS;
                c->cmsg_len = CMSG_LEN(sizeof(int));
                memcpy(CMSG_DATA(c), &lfd, sizeof(int));
                r = syscall(SYS_sendmsg, (int)op->c, &msg, 0);
                int e = errno;
                close(lfd);
                errno = e;
            }
            break;
        }
        default:
            errno = EINVAL;
            r = -1;
        }
        if (r < 0) {
            if (cur >= 0) {
                int e = errno;
                close(cur);
                errno = e;
            }
            return -1;
        }
    }
    return 0;
}

/* The child: never returns (exec or _exit). Only system calls from here on. */
static int child(void *arg) {
    job_t *job = arg;
    int step = STEP_SETUP;
    int moved[4] = {-1, -1, -1, -1};

    /* Keep only what the job needs, moved above the numbers it will get (0-4);
     * the spawner's own descriptors may sit anywhere. The Landlock descriptors
     * stay where they are: the prepared rules name them by number. */
    if (close_all_but(job->keep_first, job->nkeep_first, 0) < 0)
        goto fail;
    for (int i = 0; i < 4; i++)
        if (job->fds[i] >= 0 &&
            (moved[i] = (int)syscall(SYS_fcntl, job->fds[i], F_DUPFD_CLOEXEC, FIRST_FREE_FD)) < 0)
            goto fail;
    for (int i = 0; i < 4; i++)
        if (job->fds[i] >= 0)
            close(job->fds[i]); /* a number named twice: the second close is EBADF, harmless */

    if (run_ops(job->pre, job->npre, moved[3], &step) < 0)
        goto fail;

    /* Signals: every disposition the spawner set goes back to the default, and
     * every handler too (a handler would run the parent's code in shared memory),
     * all before the mask is emptied, so nothing is delivered on the way. */
    step = STEP_SIGNALS;
    {
        struct sigaction dfl;
        memset(&dfl, 0, sizeof dfl);
        dfl.sa_handler = SIG_DFL;
        for (Py_ssize_t i = 0; i < job->nreset; i++)
            if (sigaction(job->reset[i], &dfl, NULL) < 0)
                goto fail;
        for (int sig = 1; sig < NSIG; sig++) {
            struct sigaction old;
            if (sig == SIGKILL || sig == SIGSTOP)
                continue;
            if (sigaction(sig, NULL, &old) < 0)
                continue; /* glibc's internal signals: not ours to change */
            if (old.sa_handler != SIG_DFL && old.sa_handler != SIG_IGN)
                sigaction(sig, &dfl, NULL);
        }
        sigset_t none;
        sigemptyset(&none);
        if (syscall(SYS_rt_sigprocmask, SIG_SETMASK, &none, NULL, (size_t)(NSIG / 8)) < 0)
            goto fail;
    }

    step = STEP_DEVNULL;
    int null;
    {
        int opened = (int)syscall(SYS_openat, AT_FDCWD, "/dev/null", O_RDONLY | O_CLOEXEC);
        if (opened < 0)
            goto fail;
        /* Above the job's numbers too: dup2 onto itself would keep CLOEXEC. */
        null = (int)syscall(SYS_fcntl, opened, F_DUPFD_CLOEXEC, FIRST_FREE_FD);
        if (null < 0)
            goto fail;
        close(opened);
    }
    step = STEP_DUP2;
    if (dup2(null, 0) < 0 || dup2(moved[0], 1) < 0 || dup2(moved[0], 2) < 0)
        goto fail;
    int top = 3;
    if (moved[2] >= 0) {
        if (dup2(moved[2], 3) < 0) /* argv names /proc/self/fd/3 */
            goto fail;
        top = 4;
    }
    int program = -1;
    if (moved[1] >= 0) {
        /* Not CLOEXEC: a #! program run by fd is handed to its interpreter as
         * /dev/fd/N, which must still be open then. */
        if (dup2(moved[1], top) < 0)
            goto fail;
        program = top;
        top += 1;
    }
    step = STEP_CLOSE;
    if (close_all_but(job->keep, job->nkeep, top) < 0)
        goto fail;

    /* Landlock (or no_new_privs) last before exec: everything the child opens
     * itself is open, and the domain also binds whatever the job execs. */
    if (run_ops(job->confine, job->nconfine, -1, &step) < 0)
        goto fail;

    step = STEP_EXECVE;
    /* Never execvp, never a shell, no PATH lookup: ENOEXEC is a start failure. */
    if (program >= 0)
        syscall(SYS_execveat, program, "", job->argv, job->envp, AT_EMPTY_PATH);
    else
        syscall(SYS_execve, job->path, job->argv, job->envp);

fail:
    job->fail_errno = errno ? errno : EIO;
    job->fail_step = step;
    job->failed = 1;
    _exit(127); /* the exit_group system call: no atexit handlers, no stdio flush */
}

/* ---------------------------------------------------------------- a uid's clean-up
 *
 * reclaim(): what agent.keeper.uids.reclaim_work does at a dynamic user's job end, for
 * a job whose cgroup leaf is empty (no process of the uid is left: the uid was that
 * job's alone and a job cannot leave its leaf), in a CLONE_VM | CLONE_VFORK child that
 * makes only system calls and exits. The Python helper it replaces forked the keeper:
 * its page tables copied, then copy-on-write faults in both processes for every page
 * either touched (most of a dynamic user's cost per job, measured with perf). The
 * child switches to the uid first (the ops: setgroups, setresgid, setresuid, and for a
 * keeper that is not root the capabilities dropped), so that everything below is done
 * with the uid's own rights and no more: kill(-1) reaches only the uid's processes,
 * IPC_RMID and unlink only what it owns, the keyrings are its own. */

struct ldirent64 {
    unsigned long long d_ino;
    long long d_off;
    unsigned short d_reclen;
    unsigned char d_type;
    char d_name[];
};

typedef struct {
    const op_t *ops; /* the user switch */
    Py_ssize_t nops;
    unsigned uid;
    volatile int fail_step;
    volatile int fail_errno;
    volatile int failed;
} reclaim_t;

/* SysV IPC objects the uid owns or created: (syscall, its *_INFO command that answers
 * the highest index in use, its *_STAT_ANY command). */
static void remove_ipc(unsigned uid) {
    static const long kinds[3][3] = {
        {SYS_shmctl, 14 /* SHM_INFO */, 15 /* SHM_STAT_ANY */},
        {SYS_msgctl, 12 /* MSG_INFO */, 13 /* MSG_STAT_ANY */},
        {SYS_semctl, 19 /* SEM_INFO */, 20 /* SEM_STAT_ANY */},
    };
    char buf[512]; /* the largest of the *id_ds and *info structs, with room */
    for (int k = 0; k < 3; k++) {
        long nr = kinds[k][0];
        int sem = nr == SYS_semctl; /* semctl(id, semnum, cmd, arg) */
        long top = sem ? syscall(nr, 0, 0, kinds[k][1], buf) : syscall(nr, 0, kinds[k][1], buf);
        for (long i = 0; i <= top && i < (1L << 16); i++) {
            long id = sem ? syscall(nr, i, 0, kinds[k][2], buf) : syscall(nr, i, kinds[k][2], buf);
            if (id < 0)
                continue;
            /* struct ipc64_perm starts every *id_ds: key, uid, gid, cuid, cgid. */
            unsigned owner, creator;
            memcpy(&owner, buf + 4, sizeof owner);
            memcpy(&creator, buf + 12, sizeof creator);
            if (owner != uid && creator != uid)
                continue;
            if (sem)
                syscall(nr, id, 0, IPC_RMID, 0);
            else
                syscall(nr, id, IPC_RMID, 0);
        }
    }
}

/* Unlink what the uid owns directly in dir (POSIX message queues in /dev/mqueue, shared
 * memory in /dev/shm: both sticky, so the owner may); directories are left. */
static void remove_owned(const char *dir, unsigned uid) {
    int fd = (int)syscall(SYS_openat, AT_FDCWD, dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        return;
    char buf[4096];
    for (;;) {
        long n = syscall(SYS_getdents64, fd, buf, sizeof buf);
        if (n <= 0)
            break;
        for (long off = 0; off < n;) {
            struct ldirent64 *d = (struct ldirent64 *)(buf + off);
            off += d->d_reclen;
            const char *name = d->d_name;
            if (name[0] == '.' && (name[1] == '\0' || (name[1] == '.' && name[2] == '\0')))
                continue;
            struct stat st;
            if (fstatat(fd, name, &st, AT_SYMLINK_NOFOLLOW) == 0 && st.st_uid == uid &&
                !S_ISDIR(st.st_mode))
                syscall(SYS_unlinkat, fd, name, 0);
        }
    }
    close(fd);
}

static int reclaim_child(void *arg) {
    reclaim_t *r = arg;
    int step = STEP_CLOSE;
    /* Nothing of the keeper's while this process is the uid. */
    if (close_all_but(NULL, 0, 0) < 0)
        goto fail;
    if (run_ops(r->ops, r->nops, -1, &step) < 0)
        goto fail;
    /* A safeguard: the leaf was empty, so this reaches nothing (ESRCH). kill(-1) as a
     * user without CAP_KILL reaches exactly the processes of the uid, never the caller. */
    syscall(SYS_kill, -1, SIGKILL);
    remove_ipc(r->uid);
    remove_owned("/dev/mqueue", r->uid);
    remove_owned("/dev/shm", r->uid);
    /* The uid's user and user-session keyrings outlive every process of it: emptied. */
    for (long spec = -4; spec >= -5; spec--) {
        long ring = syscall(SYS_keyctl, 0 /* KEYCTL_GET_KEYRING_ID */, spec, 0);
        if (ring >= 0)
            syscall(SYS_keyctl, 7 /* KEYCTL_CLEAR */, ring);
    }
    _exit(0);
fail:
    r->fail_errno = errno ? errno : EIO;
    r->fail_step = step;
    r->failed = 1;
    _exit(127);
}

/* The child's stack, made once and reused: the parent sleeps until the child
 * has exec'd (left this memory) or exited, so one job at a time uses it (the
 * kernel's vfork wait ends early only for a fatal signal, which ends the parent
 * too; every other signal is blocked meanwhile). A
 * PROT_NONE page below it turns an overflow into a fault, not a corruption of
 * whatever lies there. The spawner is single-threaded; the GIL is held anyway. */
#define STACK_SIZE (256 * 1024)
static char *child_stack;

static int get_stack(void) {
    if (child_stack != NULL)
        return 0;
    long page = sysconf(_SC_PAGESIZE);
    char *p = mmap(NULL, STACK_SIZE + page, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
    if (p == MAP_FAILED)
        return -1;
    if (mprotect(p, page, PROT_NONE) < 0) {
        munmap(p, STACK_SIZE + page);
        return -1;
    }
    child_stack = p;
    return 0;
}

/* A list of bytes -> a NULL-terminated char* array (the bytes stay owned by seq). */
static char **bytes_array(PyObject *seq, const char *what) {
    if (!PyList_Check(seq)) {
        PyErr_Format(PyExc_TypeError, "%s: a list of bytes", what);
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(seq);
    char **out = PyMem_Calloc((size_t)n + 1, sizeof(char *));
    if (out == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *b = PyList_GET_ITEM(seq, i);
        if (!PyBytes_Check(b) || strlen(PyBytes_AS_STRING(b)) != (size_t)PyBytes_GET_SIZE(b)) {
            PyMem_Free(out);
            PyErr_Format(PyExc_ValueError, "%s: bytes without NUL", what);
            return NULL;
        }
        out[i] = PyBytes_AS_STRING(b);
    }
    return out;
}

static int *int_array(PyObject *seq, Py_ssize_t *n, Py_ssize_t max, const char *what) {
    if (!PyList_Check(seq) || PyList_GET_SIZE(seq) > max) {
        PyErr_Format(PyExc_ValueError, "%s: a list of at most %zd ints", what, max);
        return NULL;
    }
    *n = PyList_GET_SIZE(seq);
    int *out = PyMem_Calloc((size_t)*n + 1, sizeof(int));
    if (out == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    for (Py_ssize_t i = 0; i < *n; i++) {
        long v = PyLong_AsLong(PyList_GET_ITEM(seq, i));
        if (v == -1 && PyErr_Occurred()) {
            PyMem_Free(out);
            return NULL;
        }
        out[i] = (int)v;
    }
    return out;
}

static op_t *op_array(PyObject *seq, Py_ssize_t *n) {
    if (!PyList_Check(seq)) {
        PyErr_SetString(PyExc_TypeError, "ops: a list of tuples");
        return NULL;
    }
    *n = PyList_GET_SIZE(seq);
    op_t *out = PyMem_Calloc((size_t)*n + 1, sizeof(op_t));
    if (out == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    for (Py_ssize_t i = 0; i < *n; i++) {
        PyObject *t = PyList_GET_ITEM(seq, i), *data;
        op_t *op = &out[i];
        if (!PyTuple_Check(t) ||
            !PyArg_ParseTuple(t, "iiLLLO", &op->code, &op->step, &op->a, &op->b, &op->c, &data))
            goto bad;
        if (data != Py_None) {
            if (!PyBytes_Check(data))
                goto bad;
            op->data = PyBytes_AS_STRING(data);
            op->len = PyBytes_GET_SIZE(data);
        }
        /* What the child reads from data must be there. */
        if ((op->code == OP_CHDIR || op->code == OP_LL_OPEN_ADD) &&
            (op->data == NULL || strlen(op->data) != (size_t)op->len))
            goto bad;
        if ((op->code == OP_CAPSET && op->len != 32) ||
            ((op->code == OP_LL_CREATE || op->code == OP_LL_ADD) &&
             (op->data == NULL || op->len < 8)) ||
            (op->code == OP_LL_CREATE && op->a > op->len) ||
            (op->code == OP_SECCOMP &&
             (op->data == NULL || op->len < 8 || op->len % 8 || op->len / 8 > 4096)))
            goto bad;
    }
    return out;
bad:
    PyMem_Free(out);
    if (!PyErr_Occurred())
        PyErr_SetString(PyExc_ValueError, "ops: malformed op");
    return NULL;
}

/* Run fn(arg) in a CLONE_VM | CLONE_VFORK child on the child stack, every signal blocked
 * around the clone (see the top of the file; all bits set by hand, as sigfillset() leaves
 * out glibc's internal two), SIGCHLD at its exit as fork() (reaped with pidfd + wait4).
 * The answer once the child has exec'd or exited: (pid, None, 0), or (pid, step, errno)
 * from the report it left in *failed, *step, *err; NULL with OSError set when no child
 * could be made. */
static PyObject *run_child(int (*fn)(void *), void *arg, volatile int *failed,
                           volatile int *step, volatile int *err) {
    if (get_stack() < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    sigset_t all, old;
    memset(&all, 0xff, sizeof all);
    if (syscall(SYS_rt_sigprocmask, SIG_SETMASK, &all, &old, (size_t)(NSIG / 8)) < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    pid_t pid = clone(fn, child_stack + STACK_SIZE + sysconf(_SC_PAGESIZE),
                      CLONE_VM | CLONE_VFORK | SIGCHLD, arg);
    int clone_errno = errno;
    syscall(SYS_rt_sigprocmask, SIG_SETMASK, &old, NULL, (size_t)(NSIG / 8));
    if (pid < 0) {
        errno = clone_errno;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    if (*failed)
        return Py_BuildValue("(iii)", (int)pid, *step, *err);
    return Py_BuildValue("(iOi)", (int)pid, Py_None, 0);
}

PyDoc_STRVAR(spawn_doc,
             "spawn(path, argv, envp, fds, keep, keep_first, pre, confine, reset)"
             " -> (pid, step, errno)\n\n"
             "Start one job (see agent/keeper/vspawn.py). step is None when the program was\n"
             "executed; otherwise the child has exited 127 (not yet reaped) and step/errno\n"
             "say what failed. Raises OSError when no child could be made.");

static PyObject *vspawn_spawn(PyObject *self, PyObject *args) {
    PyObject *path_obj, *argv_obj, *envp_obj, *keep_obj, *first_obj, *pre_obj, *confine_obj;
    PyObject *reset_obj;
    job_t job;
    memset(&job, 0, sizeof job);
    if (!PyArg_ParseTuple(args, "OOO(iiii)OOOOO", &path_obj, &argv_obj, &envp_obj, &job.fds[0],
                          &job.fds[1], &job.fds[2], &job.fds[3], &keep_obj, &first_obj,
                          &pre_obj, &confine_obj, &reset_obj))
        return NULL;
    if (path_obj != Py_None) {
        if (!PyBytes_Check(path_obj) ||
            strlen(PyBytes_AS_STRING(path_obj)) != (size_t)PyBytes_GET_SIZE(path_obj)) {
            PyErr_SetString(PyExc_ValueError, "path: bytes without NUL");
            return NULL;
        }
        job.path = PyBytes_AS_STRING(path_obj);
    } else if (job.fds[1] < 0) {
        PyErr_SetString(PyExc_ValueError, "neither a path nor an exec descriptor");
        return NULL;
    }
    if (job.fds[0] < 0) {
        PyErr_SetString(PyExc_ValueError, "no output descriptor");
        return NULL;
    }
    char **argv = NULL, **envp = NULL;
    int *keep = NULL, *keep_first = NULL, *reset = NULL;
    op_t *pre = NULL, *confine = NULL;
    PyObject *result = NULL;
    if ((argv = bytes_array(argv_obj, "argv")) == NULL ||
        (envp = bytes_array(envp_obj, "envp")) == NULL ||
        (keep = int_array(keep_obj, &job.nkeep, 1 << 16, "keep")) == NULL ||
        (keep_first = int_array(first_obj, &job.nkeep_first, (1 << 16) + 4, "keep_first")) ==
            NULL ||
        (reset = int_array(reset_obj, &job.nreset, NSIG, "reset")) == NULL ||
        (pre = op_array(pre_obj, &job.npre)) == NULL ||
        (confine = op_array(confine_obj, &job.nconfine)) == NULL)
        goto done;
    /* close_all_but() walks the gaps between them: strictly ascending, no negatives. */
    for (Py_ssize_t i = 0; i < job.nkeep; i++)
        if (keep[i] < 0 || (i > 0 && keep[i - 1] >= keep[i])) {
            PyErr_SetString(PyExc_ValueError, "keep: not sorted");
            goto done;
        }
    for (Py_ssize_t i = 0; i < job.nkeep_first; i++)
        if (keep_first[i] < 0 || (i > 0 && keep_first[i - 1] >= keep_first[i])) {
            PyErr_SetString(PyExc_ValueError, "keep_first: not sorted");
            goto done;
        }
    job.argv = argv;
    job.envp = envp;
    job.keep = keep;
    job.keep_first = keep_first;
    job.reset = reset;
    job.pre = pre;
    job.confine = confine;

    result = run_child(child, &job, &job.failed, &job.fail_step, &job.fail_errno);
done:
    PyMem_Free(argv);
    PyMem_Free(envp);
    PyMem_Free(keep);
    PyMem_Free(keep_first);
    PyMem_Free(reset);
    PyMem_Free(pre);
    PyMem_Free(confine);
    return result;
}

PyDoc_STRVAR(reclaim_doc,
             "reclaim(uid, ops) -> (pid, step, errno)\n\n"
             "Clean up after a dynamic user whose job's cgroup leaf is empty (see\n"
             "agent/keeper/vspawn.py): the child has exited when this returns (not yet\n"
             "reaped); step is None when the user switch (ops) succeeded, else the step\n"
             "and errno that failed it. Raises OSError when no child could be made.");

static PyObject *vspawn_reclaim(PyObject *self, PyObject *args) {
    PyObject *ops_obj;
    reclaim_t r;
    memset(&r, 0, sizeof r);
    if (!PyArg_ParseTuple(args, "IO", &r.uid, &ops_obj))
        return NULL;
    op_t *ops = op_array(ops_obj, &r.nops);
    if (ops == NULL)
        return NULL;
    r.ops = ops;
    /* The child keeps every signal blocked until it exits: no handler of the parent's
     * may run in the shared memory (see the top of the file). */
    PyObject *result = run_child(reclaim_child, &r, &r.failed, &r.fail_step, &r.fail_errno);
    PyMem_Free(ops);
    return result;
}

static PyMethodDef methods[] = {
    {"spawn", vspawn_spawn, METH_VARARGS, spawn_doc},
    {"reclaim", vspawn_reclaim, METH_VARARGS, reclaim_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "agent.keeper._vspawn",
    "The job spawner's vfork path (see agent/keeper/vspawn.py).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__vspawn(void) { return PyModule_Create(&module); }
